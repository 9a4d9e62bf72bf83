//! `envoy-docker install`: puts the binary in place, makes the proxy
//! symlinks, writes the systemd units, and shows (or, with `--apply`, makes)
//! the daemon.json change. It never edits daemon.json silently.
//!
//! The work is first planned as a list of steps, so `--dry-run` can print
//! every file it would write and write nothing.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const REGISTRAR_UNIT: &str = include_str!("../packaging/systemd/envoy-docker.service");
const ENVOY_UNIT: &str = include_str!("../packaging/systemd/envoy-docker-envoy.service");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallArgs {
    pub prefix: PathBuf,
    pub systemd_dir: PathBuf,
    pub daemon_json: PathBuf,
    /// The Envoy binary the Envoy unit runs.
    pub envoy: PathBuf,
    pub dry_run: bool,
    pub apply: bool,
}

/// One thing `install` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Copy { from: PathBuf, to: PathBuf },
    Symlink { link: PathBuf, target: String },
    Write { path: PathBuf, content: String },
}

/// The units as written for `prefix` and `envoy`.
pub fn units(prefix: &Path, envoy: &Path) -> [(&'static str, String); 2] {
    let bin = prefix.join("bin");
    let ours = bin.join("envoy-docker").display().to_string();
    let fill = |t: &str| {
        t.replace("/usr/local/bin/envoy-docker", &ours)
            .replace("/usr/local/bin/envoy ", &format!("{} ", envoy.display()))
    };
    [
        ("envoy-docker.service", fill(REGISTRAR_UNIT)),
        ("envoy-docker-envoy.service", fill(ENVOY_UNIT)),
    ]
}

/// The keys dockerd needs, pointing at the installed proxy symlink. Only
/// these two: Docker's firewall (`iptables`) stays as it is, on by
/// default, and the registrar claims the published ports ahead of its DNAT
/// (see `nft`). `userland-proxy` is set because without it dockerd starts
/// no proxy at all (and moby PR #50652 proposes turning it off by default).
pub fn daemon_settings(prefix: &Path) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "userland-proxy-path".into(),
        Value::String(prefix.join("bin/docker-proxy").display().to_string()),
    );
    m.insert("userland-proxy".into(), Value::Bool(true));
    m
}

/// What an `"iptables": false` already in daemon.json costs, to be said
/// when it is seen; `None` when Docker's firewall is on.
pub fn iptables_off_cost(existing: Option<&str>) -> Option<&'static str> {
    let doc: Value = serde_json::from_str(existing?).ok()?;
    (doc.get("iptables") == Some(&Value::Bool(false))).then_some(
        "daemon.json says \"iptables\": false, and install leaves it so. It costs containers \
their outbound NAT (no MASQUERADE: a container cannot reach anything beyond this host) \
and the isolation between Docker networks. envoy-docker no longer needs it: with \
Docker's firewall on, the registrar claims published ports in nftables, ahead of \
Docker's DNAT. Remove the key to get Docker's networking back.",
    )
}

/// Why `install` stopped; what it did before stays done and was said.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find this binary")]
    NoExe(#[source] std::io::Error),
    /// A file or directory that could not be read, written or moved.
    #[error("{0}")]
    File(String, #[source] std::io::Error),
    #[error("{0} exists and is not a file; remove it first")]
    NotAFile(PathBuf),
    #[error("{0} is a regular file, and {1} exists already; move one of them away first")]
    AsideTaken(PathBuf, PathBuf),
    #[error("daemon.json is not a JSON object")]
    NotAnObject,
    #[error("daemon.json is not valid JSON")]
    BadJson(#[source] serde_json::Error),
}

fn file_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::File(what.to_string(), e)
}

/// Merges our keys into an existing daemon.json, keeping every other key.
pub fn merge_daemon_json(existing: Option<&str>, prefix: &Path) -> Result<String, Error> {
    let mut doc = match existing.map(str::trim).filter(|s| !s.is_empty()) {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text).map_err(Error::BadJson)? {
            Value::Object(m) => m,
            _ => return Err(Error::NotAnObject),
        },
    };
    doc.extend(daemon_settings(prefix));
    serde_json::to_string_pretty(&Value::Object(doc))
        .map(|s| s + "\n")
        .map_err(Error::BadJson)
}

pub fn plan(args: &InstallArgs, exe: &Path) -> Vec<Step> {
    let bin = args.prefix.join("bin");
    let target = bin.join("envoy-docker");
    let mut steps = Vec::new();
    if exe != target {
        steps.push(Step::Copy {
            from: exe.to_path_buf(),
            to: target,
        });
    }
    for name in crate::cmdline::PROXY_NAMES {
        steps.push(Step::Symlink {
            link: bin.join(name),
            target: "envoy-docker".into(),
        });
    }
    for (name, content) in units(&args.prefix, &args.envoy) {
        steps.push(Step::Write {
            path: args.systemd_dir.join(name),
            content,
        });
    }
    steps
}

fn apply(step: &Step) -> Result<(), Error> {
    let parent = |p: &Path| {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(file_error(dir.display()))?;
        }
        Ok::<(), Error>(())
    };
    match step {
        Step::Copy { from, to } => {
            parent(to)?;
            // Copy then rename, so a running binary is replaced, not rewritten.
            let tmp = to.with_extension("new");
            std::fs::copy(from, &tmp)
                .and_then(|_| std::fs::rename(&tmp, to))
                .map_err(file_error(format!(
                    "{} -> {}",
                    from.display(),
                    to.display()
                )))
        }
        Step::Symlink { link, target } => {
            parent(link)?;
            set_aside(link)?;
            let _ = std::fs::remove_file(link);
            std::os::unix::fs::symlink(target, link).map_err(file_error(link.display()))
        }
        Step::Write { path, content } => {
            parent(path)?;
            write_atomic(path, content)
        }
    }
}

/// A regular file where a symlink goes (a real docker-proxy, say) is moved
/// to `<name>.before-envoy-docker`, never overwriting an earlier one.
fn set_aside(link: &Path) -> Result<(), Error> {
    let Ok(meta) = std::fs::symlink_metadata(link) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if !meta.is_file() {
        return Err(Error::NotAFile(link.to_path_buf()));
    }
    let aside = PathBuf::from(format!("{}.before-envoy-docker", link.display()));
    if aside.exists() {
        return Err(Error::AsideTaken(link.to_path_buf(), aside));
    }
    std::fs::rename(link, &aside).map_err(file_error(link.display()))?;
    println!(
        "moved the regular file {} aside to {}",
        link.display(),
        aside.display()
    );
    Ok(())
}

/// Writes through a temporary file and a rename, so that a crash leaves
/// either the old file or the new one, never half of one.
fn write_atomic(path: &Path, content: &str) -> Result<(), Error> {
    let tmp = PathBuf::from(format!("{}.envoy-docker-tmp", path.display()));
    std::fs::write(&tmp, content)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::File(path.display().to_string(), e)
        })
}

pub fn run(args: InstallArgs) -> Result<ExitCode, Error> {
    let exe = std::env::current_exe().map_err(Error::NoExe)?;
    let steps = plan(&args, &exe);
    let verb = if args.dry_run { "would " } else { "" };
    for step in &steps {
        match step {
            Step::Copy { from, to } => {
                println!("{verb}copy {} to {}", from.display(), to.display())
            }
            Step::Symlink { link, target } => println!("{verb}link {} -> {target}", link.display()),
            Step::Write { path, content } => {
                println!("{verb}write {}:", path.display());
                for line in content.lines() {
                    println!("    {line}");
                }
            }
        }
        if !args.dry_run {
            apply(step)?;
        }
    }

    let json = &args.daemon_json;
    let existing = match std::fs::read_to_string(json) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::File(format!("cannot read {}", json.display()), e)),
    };
    let merged = merge_daemon_json(existing.as_deref(), &args.prefix)?;
    let settings = serde_json::to_string_pretty(&Value::Object(daemon_settings(&args.prefix)))
        .unwrap_or_default();
    if let Some(cost) = iptables_off_cost(existing.as_deref()) {
        println!("note: {cost}");
    }
    if args.apply {
        let backup = json.with_extension("json.before-envoy-docker");
        println!(
            "{verb}merge into {} (keeping every other key):",
            json.display()
        );
        for line in merged.lines() {
            println!("    {line}");
        }
        // The first backup is the original: a second --apply keeps it.
        let back_up = existing.is_some() && !backup.exists();
        if back_up {
            println!("{verb}back up the old file as {}", backup.display());
        } else if existing.is_some() {
            println!("keeping the existing backup {}", backup.display());
        }
        if !args.dry_run {
            if let Some(old) = existing.as_ref().filter(|_| back_up) {
                write_atomic(&backup, old)?;
            }
            if let Some(dir) = json.parent() {
                std::fs::create_dir_all(dir).map_err(file_error(dir.display()))?;
            }
            write_atomic(json, &merged)?;
        }
    } else {
        println!("\ndockerd needs these keys in {} (run again with --apply to merge them, keeping the rest and a backup):", json.display());
        println!("{settings}");
    }
    if !args.dry_run {
        println!("\nthen: systemctl daemon-reload && systemctl enable --now envoy-docker envoy-docker-envoy && systemctl restart docker");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_prefix_and_envoy_path() {
        let [(_, reg), (_, env)] = units(Path::new("/opt/ed"), Path::new("/usr/bin/envoy"));
        assert!(reg.contains("ExecStart=/opt/ed/bin/envoy-docker serve"));
        assert!(reg.contains("Type=notify") && reg.contains("Before=docker.service"));
        assert!(env.contains("ExecStart=/usr/bin/envoy -c /run/envoy-docker-envoy/envoy.yaml"));
        assert!(env.contains("ExecStartPre=/opt/ed/bin/envoy-docker bootstrap --output"));
    }

    #[test]
    fn daemon_json_merge_keeps_other_keys_and_refuses_garbage() {
        let merged = merge_daemon_json(
            Some(r#"{"log-driver": "journald", "iptables": true}"#),
            Path::new("/usr/local"),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&merged).unwrap();
        assert_eq!(v["log-driver"], "journald");
        assert_eq!(v["iptables"], true, "Docker's firewall is left on");
        assert_eq!(v["userland-proxy"], true);
        assert_eq!(v["userland-proxy-path"], "/usr/local/bin/docker-proxy");
        // Nothing says iptables: no key is added for it.
        let fresh: Value =
            serde_json::from_str(&merge_daemon_json(None, Path::new("/x")).unwrap()).unwrap();
        assert!(fresh.get("iptables").is_none());
        // An old setup's iptables: false is kept, and its cost is said.
        let old = r#"{"iptables": false, "userland-proxy-path": "/old/docker-proxy"}"#;
        let kept: Value =
            serde_json::from_str(&merge_daemon_json(Some(old), Path::new("/x")).unwrap()).unwrap();
        assert_eq!(kept["iptables"], false);
        assert_eq!(kept["userland-proxy-path"], "/x/bin/docker-proxy");
        assert!(iptables_off_cost(Some(old))
            .unwrap()
            .contains("outbound NAT"));
        assert!(iptables_off_cost(Some(r#"{"iptables": true}"#)).is_none());
        assert!(iptables_off_cost(Some("{}")).is_none());
        assert!(iptables_off_cost(Some("{oops")).is_none());
        assert!(iptables_off_cost(None).is_none());
        assert!(merge_daemon_json(None, Path::new("/x"))
            .unwrap()
            .contains("/x/bin/docker-proxy"));
        assert!(merge_daemon_json(Some("[1]"), Path::new("/x")).is_err());
        assert!(merge_daemon_json(Some("{oops"), Path::new("/x")).is_err());
    }

    #[test]
    fn plan_copies_links_and_writes_units() {
        let args = InstallArgs {
            prefix: "/p".into(),
            systemd_dir: "/s".into(),
            daemon_json: "/d/daemon.json".into(),
            envoy: "/e/envoy".into(),
            dry_run: true,
            apply: false,
        };
        let steps = plan(&args, Path::new("/build/envoy-docker"));
        assert_eq!(steps.len(), 5);
        assert!(
            matches!(&steps[0], Step::Copy { to, .. } if to == Path::new("/p/bin/envoy-docker"))
        );
        // Installing from the installed binary copies nothing.
        assert_eq!(plan(&args, Path::new("/p/bin/envoy-docker")).len(), 4);
    }
}
