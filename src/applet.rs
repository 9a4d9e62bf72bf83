//! Picks the role from argv[0] or the first argument, busybox style.
//!
//! A symlink named `docker-proxy` or `envoy-docker-shim` is the proxy role;
//! any other name takes a subcommand. Each role then gets exactly the
//! arguments it would get under its own name, so `docker-proxy -proto tcp`
//! and `envoy-docker proxy -proto tcp` parse the same list.

use crate::cmdline::is_proxy_name;
use std::ffi::OsString;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applet {
    Proxy,
    Serve,
    Resync,
    Bootstrap,
    Status,
    Install,
    Ca,
    Version,
    /// `help [SUBCOMMAND]`, `--help`, or no arguments at all.
    Help,
}

impl Applet {
    pub fn from_subcommand(s: &str) -> Option<Applet> {
        Some(match s {
            "proxy" => Applet::Proxy,
            "serve" => Applet::Serve,
            "resync" => Applet::Resync,
            "bootstrap" => Applet::Bootstrap,
            "status" => Applet::Status,
            "install" => Applet::Install,
            "ca" => Applet::Ca,
            "version" | "--version" | "-V" => Applet::Version,
            "help" | "--help" | "-h" => Applet::Help,
            _ => return None,
        })
    }
}

/// Splits argv into the role and that role's own arguments.
pub fn dispatch(argv: &[OsString]) -> Result<(Applet, Vec<OsString>), String> {
    let Some((argv0, rest)) = argv.split_first() else {
        return Ok((Applet::Help, Vec::new()));
    };
    if is_proxy_name(argv0) {
        return Ok((Applet::Proxy, rest.to_vec()));
    }
    let Some((sub, args)) = rest.split_first() else {
        return Ok((Applet::Help, Vec::new()));
    };
    let name = sub.to_string_lossy();
    match Applet::from_subcommand(&name) {
        Some(applet) => Ok((applet, args.to_vec())),
        None => Err(format!(
            "unknown subcommand {name:?}; run `envoy-docker help` for the list"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn proxy_by_symlink_name_keeps_every_argument() {
        for argv0 in [
            "docker-proxy",
            "/usr/bin/docker-proxy",
            "./envoy-docker-shim",
        ] {
            let (a, args) = dispatch(&v(&[argv0, "-proto", "tcp"])).unwrap();
            assert_eq!(a, Applet::Proxy);
            assert_eq!(args, v(&["-proto", "tcp"]));
        }
    }

    #[test]
    fn subcommands_get_the_same_arguments_as_the_symlink() {
        let (a, args) = dispatch(&v(&["/x/envoy-docker", "proxy", "-proto", "tcp"])).unwrap();
        assert_eq!(a, Applet::Proxy);
        assert_eq!(args, v(&["-proto", "tcp"]));
        let (a, args) = dispatch(&v(&["envoy-docker", "serve", "--xds", "unix:/x"])).unwrap();
        assert_eq!(a, Applet::Serve);
        assert_eq!(args, v(&["--xds", "unix:/x"]));
    }

    #[test]
    fn version_help_and_unknowns() {
        assert_eq!(
            dispatch(&v(&["e", "--version"])).unwrap().0,
            Applet::Version
        );
        assert_eq!(dispatch(&v(&["e", "version"])).unwrap().0, Applet::Version);
        assert_eq!(dispatch(&v(&["e"])).unwrap().0, Applet::Help);
        assert_eq!(dispatch(&v(&[])).unwrap().0, Applet::Help);
        let (a, args) = dispatch(&v(&["e", "help", "serve"])).unwrap();
        assert_eq!((a, args), (Applet::Help, v(&["serve"])));
        assert!(dispatch(&v(&["e", "frobnicate"]))
            .unwrap_err()
            .contains("frobnicate"));
        assert!(!is_proxy_name(OsStr::new("docker-proxy-old")));
    }
}
