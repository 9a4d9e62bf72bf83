//! The packaging issue's tests: install, systemd units and readiness, Envoy
//! supervision, the example bootstrap, and the registrar's container image
//! against the real dockerd.

use crate::harness::dockerd::{self, IMAGE};
use crate::harness::{
    admin_get, bin, envoy_bin, first_get, free_port, http_get, wait_until, TempDir,
};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn install(dir: &TempDir, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("install")
        .arg("--prefix")
        .arg(dir.path("usr"))
        .arg("--systemd-dir")
        .arg(dir.path("units"))
        .arg("--daemon-json")
        .arg(dir.path("etc/docker/daemon.json"))
        .arg("--envoy")
        .arg(envoy_bin())
        .args(extra)
        .output()
        .unwrap()
}

fn files_under(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            out.extend(files_under(&e.path()));
        }
    }
    out
}

#[test]
fn install_dry_run_writes_nothing_and_names_every_file() {
    let dir = TempDir::new("install-dry");
    let out = install(&dir, &["--dry-run", "--apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        files_under(&dir.0).is_empty(),
        "dry run wrote {:?}",
        files_under(&dir.0)
    );
    for f in [
        "usr/bin/envoy-docker",
        "usr/bin/docker-proxy",
        "usr/bin/envoy-docker-shim",
        "units/envoy-docker.service",
        "units/envoy-docker-envoy.service",
        "etc/docker/daemon.json",
    ] {
        assert!(
            text.contains(&dir.path(f).display().to_string()),
            "{f} missing in:\n{text}"
        );
    }
}

#[test]
fn install_puts_everything_in_place_and_the_units_verify() {
    let dir = TempDir::new("install");
    let json = dir.path("etc/docker/daemon.json");
    std::fs::create_dir_all(json.parent().unwrap()).unwrap();
    let old = r#"{"log-driver": "journald", "data-root": "/srv/docker"}"#;
    std::fs::write(&json, old).unwrap();

    // Without --apply, daemon.json is only shown.
    let out = install(&dir, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"userland-proxy-path\""));
    assert_eq!(std::fs::read_to_string(&json).unwrap(), old);

    // The proxy symlinks run the installed binary.
    let v = Command::new(dir.path("usr/bin/docker-proxy"))
        .arg("-v")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains("envoy-docker"));
    let shim = std::fs::read_link(dir.path("usr/bin/envoy-docker-shim")).unwrap();
    assert_eq!(shim, Path::new("envoy-docker"));

    // systemd accepts the units as written.
    let units = [
        dir.path("units/envoy-docker.service"),
        dir.path("units/envoy-docker-envoy.service"),
    ];
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "systemd-analyze verify: {said}");
    let unit = std::fs::read_to_string(&units[0]).unwrap();
    assert!(unit.contains(&format!(
        "ExecStart={} serve",
        dir.path("usr/bin/envoy-docker").display()
    )));
    for needed in [
        "Type=notify",
        "Before=docker.service",
        "Restart=always",
        "ProtectSystem=",
        "PrivateTmp=yes",
        "RuntimeDirectory=envoy-docker",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(needed), "{needed} missing");
    }

    // --apply merges, keeps the other keys and a backup.
    let out = install(&dir, &["--apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(merged["log-driver"], "journald");
    assert_eq!(merged["data-root"], "/srv/docker");
    // Docker's firewall is left as it was (here: its default, on).
    assert!(merged.get("iptables").is_none(), "{merged}");
    assert_eq!(merged["userland-proxy"], true);
    assert_eq!(
        merged["userland-proxy-path"],
        dir.path("usr/bin/docker-proxy").display().to_string()
    );
    let backup = json.with_extension("json.before-envoy-docker");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), old);

    // A second --apply keeps the first backup: the original file.
    let out = install(&dir, &["--apply"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeping the existing backup"));
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), old);
    // Files are written through a rename: no temporary file is left.
    for d in ["etc/docker", "units"] {
        let left: Vec<_> = files_under(&dir.path(d))
            .into_iter()
            .filter(|f| f.ends_with(".envoy-docker-tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    // A broken daemon.json is refused, not overwritten.
    std::fs::write(&json, "{not json").unwrap();
    let out = install(&dir, &["--apply"]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&json).unwrap(), "{not json");
}

#[test]
fn install_sets_a_real_docker_proxy_aside_and_never_loses_it() {
    let dir = TempDir::new("install-aside");
    let proxy = dir.path("usr/bin/docker-proxy");
    std::fs::create_dir_all(proxy.parent().unwrap()).unwrap();
    std::fs::write(&proxy, "the distribution's docker-proxy").unwrap();
    let out = install(&dir, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved the regular file"));
    let aside = dir.path("usr/bin/docker-proxy.before-envoy-docker");
    assert_eq!(
        std::fs::read_to_string(&aside).unwrap(),
        "the distribution's docker-proxy"
    );
    assert!(std::fs::symlink_metadata(&proxy)
        .unwrap()
        .file_type()
        .is_symlink());
    // Again with a regular file there and the first one set aside already:
    // refused, and both files are kept as they are.
    std::fs::remove_file(&proxy).unwrap();
    std::fs::write(&proxy, "another one").unwrap();
    let out = install(&dir, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    assert_eq!(std::fs::read_to_string(&proxy).unwrap(), "another one");
    assert_eq!(
        std::fs::read_to_string(&aside).unwrap(),
        "the distribution's docker-proxy"
    );
}

#[test]
fn the_checked_in_units_are_what_install_writes_for_usr_local() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(bin())
        .args([
            "install",
            "--dry-run",
            "--prefix",
            "/usr/local",
            "--envoy",
            "/usr/local/bin/envoy",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for unit in ["envoy-docker.service", "envoy-docker-envoy.service"] {
        let file = std::fs::read_to_string(root.join("packaging/systemd").join(unit)).unwrap();
        let indented: String = file.lines().map(|l| format!("    {l}\n")).collect();
        assert!(
            text.contains(&indented),
            "{unit} differs from what install writes"
        );
    }
}

/// `envoy-docker serve` on private addresses, without Docker.
fn serve_cmd(dir: &TempDir) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(dir.path("run/registrar.sock"))
        .args(["--xds", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--docker", "none", "--nft", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

#[test]
fn serve_tells_systemd_it_is_ready() {
    let dir = TempDir::new("notify");
    let notify = UnixDatagram::bind(dir.path("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut serve = serve_cmd(&dir)
        .env("NOTIFY_SOCKET", dir.path("notify.sock"))
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 from serve");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1"), "{msg:?}");
    // By then the socket is served.
    assert!(std::os::unix::net::UnixStream::connect(dir.path("run/registrar.sock")).is_ok());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(serve.wait().unwrap().success());
}

#[test]
fn serve_runs_restarts_and_stops_envoy() {
    let dir = TempDir::new("supervise");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut serve = serve_cmd(&dir)
        .args(["--envoy", &envoy_bin()])
        .args(["--envoy-admin", &admin.to_string()])
        .spawn()
        .unwrap();
    let ready = || matches!(http_get(admin, "/ready"), Ok((200, _)));
    assert!(
        wait_until(Duration::from_secs(20), ready),
        "supervised Envoy never ready"
    );
    assert!(std::fs::read_to_string(dir.path("run/envoy.yaml"))
        .unwrap()
        .contains("ads_config"));

    // Kill Envoy: the registrar starts it again.
    let envoys = || {
        procfs::process::all_processes()
            .unwrap()
            .flatten()
            .filter(|p| p.stat().is_ok_and(|s| s.ppid == serve.id() as i32))
            .map(|p| p.pid())
            .collect::<Vec<_>>()
    };
    let first = envoys();
    assert_eq!(first.len(), 1, "{first:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let now = envoys();
            now.len() == 1 && now != first && ready()
        }),
        "Envoy was not restarted"
    );
    assert!(admin_get(admin, "/ready").contains("LIVE"));

    // Stopping the registrar stops Envoy.
    let second = envoys()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().unwrap().success());
    assert!(
        !Path::new(&format!("/proc/{second}")).exists()
            || procfs::process::Process::new(second)
                .and_then(|p| p.stat())
                .is_ok_and(|s| s.state == 'Z')
    );
}

#[test]
fn the_example_bootstrap_is_current_and_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(bin()).arg("bootstrap").output().unwrap();
    let file = root.join("examples/envoy.yaml");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(&file).unwrap(),
        "examples/envoy.yaml is stale: regenerate it with `envoy-docker bootstrap`"
    );
    let v = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

/// Restarts the stack's own registrar however the test ends.
struct RegistrarBack<'a>(&'a mut dockerd::DockerEnv);

impl Drop for RegistrarBack<'_> {
    fn drop(&mut self) {
        let _ = self.0.docker(&["rm", "-f", "ed-registrar"]);
        self.0.stack.start_registrar();
    }
}

#[test]
fn docker_14_the_registrar_image_builds_from_scratch_and_serves() {
    let mut env = dockerd::shared();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = root.join("target/static/envoy-docker");
    if !binary.exists() {
        let out = Command::new(root.join("packaging/build-static"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ctx = env.root.join("image");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(&binary, ctx.join("envoy-docker")).unwrap();
    let out = Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", env.sock.display()))
        .args(["build", "-q", "-t", "envoy-docker:test", "-f"])
        .arg(root.join("packaging/Dockerfile"))
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The registrar from the image replaces the stack's, with the documented
    // flags: host network, host PID, the socket directory and Docker's socket.
    env.stack.kill_registrar();
    let sock = env.stack.socket.clone();
    let sock_dir = sock.parent().unwrap().display().to_string();
    let docker_sock = env.sock.display().to_string();
    let (xds, admin) = (
        env.stack.xds.to_string(),
        env.stack.registrar_admin.to_string(),
    );
    let guard = RegistrarBack(&mut env);
    let env = &*guard.0;
    let mount_dir = format!("{sock_dir}:{sock_dir}");
    let mount_docker = format!("{docker_sock}:/var/run/docker.sock");
    let sock_arg = sock.display().to_string();
    env.run(&[
        "--name",
        "ed-registrar",
        "--network",
        "host",
        "--pid",
        "host",
        "-v",
        &mount_dir,
        "-v",
        &mount_docker,
        "envoy-docker:test",
        "serve",
        "--socket",
        &sock_arg,
        "--xds",
        &xds,
        "--admin",
        &admin,
    ]);
    assert!(
        wait_until(
            Duration::from_secs(10),
            || std::os::unix::net::UnixStream::connect(&sock).is_ok()
                && matches!(
                    http_get(env.stack.registrar_admin, "/healthz"),
                    Ok((200, _))
                )
        ),
        "the containerised registrar did not come up: {}",
        String::from_utf8_lossy(&env.docker(&["logs", "ed-registrar"]).stderr)
    );
    // With no Envoy connected a registration is ready at once, so wait for
    // Envoy to reconnect to this registrar first.
    assert!(
        wait_until(Duration::from_secs(15), || admin_get(
            env.stack.registrar_admin,
            "/healthz"
        )
        .contains("\"envoys_connected\":1")),
        "Envoy did not reconnect to the containerised registrar"
    );
    let h = free_port();
    env.run(&["-p", &format!("{h}:80"), "-l", "ServiceName=imaged", IMAGE]);
    let got = first_get(SocketAddr::from(([127, 0, 0, 1], h)), "/").unwrap();
    assert_eq!(got.0, 200);
    let rows = env.stack.status();
    assert!(
        rows.iter()
            .any(|r| r["name"] == "imaged" && r["state"] == "active"),
        "{rows:#?}"
    );
    drop(guard);
}
