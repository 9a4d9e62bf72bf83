//! The registrar's open-file budget: raise the soft limit to the hard one
//! at start, and size the caps on side doors (admin, xDS) from what is left,
//! so that a flood of idle connections can never use up the descriptors
//! that proxies need.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft limit on open files to the hard limit.
pub fn raise() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!("raised the open-file limit from {soft} to {hard}"),
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft}: {e}"),
        },
        Ok((soft, _)) => tracing::debug!("open-file limit: {soft}"),
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// At most `max` connections, and never more than an eighth of the
/// open-file limit (at least 2), for a listener that is not the proxies'.
pub fn cap(max: usize) -> usize {
    let soft = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    cap_for(soft, max)
}

fn cap_for(soft: u64, max: usize) -> usize {
    let eighth = usize::try_from(soft / 8).unwrap_or(usize::MAX);
    eighth.clamp(2, max.max(2))
}

#[cfg(test)]
mod tests {
    #[test]
    fn caps_follow_the_limit() {
        assert_eq!(super::cap_for(64, 64), 8);
        assert_eq!(super::cap_for(1 << 20, 64), 64);
        assert_eq!(super::cap_for(3, 64), 2);
    }
}
