//! The observability issue's tests: traces to real OTLP and Zipkin
//! receivers, Envoy's and the registrar's metrics through Prometheus's own
//! parser, access logs, and turning tracing on without dropping a request.
//! They use the real dockerd, so that names come from container labels.

use crate::harness::collectors::{Otlp, Span, Zipkin};
use crate::harness::dockerd::{self, DockerEnv, IMAGE};
use crate::harness::watch::Watch;
use crate::harness::{admin_get, free_port, http_get, wait_until};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Restarts the registrar with `extra` flags while a client loops on
/// `ports`; asserts that not one request failed and that Envoy updated the
/// listeners in place.
fn restart_with(
    env: &mut DockerEnv,
    ports: &[u16],
    extra: &[String],
    applied: impl Fn(&str) -> bool,
) {
    let base: Vec<String> = env
        .stack
        .serve_args
        .iter()
        .take(2) // --docker URL
        .cloned()
        .collect();
    let in_place = "listener_manager.listener_in_place_updated";
    let removed = "listener_manager.listener_removed";
    let (updated0, removed0) = (env.stack.stat(in_place), env.stack.stat(removed));
    let watch = Watch::start(&env.stack, ports);
    watch.wait_served(20);
    env.stack.kill_registrar();
    env.stack.serve_args = base.into_iter().chain(extra.iter().cloned()).collect();
    env.stack.start_registrar();
    let done = wait_until(Duration::from_secs(10), || {
        applied(&admin_get(env.stack.admin, "/config_dump"))
    });
    if !done {
        let dump = admin_get(env.stack.admin, "/config_dump");
        let at = dump.find("envoy_docker_tracing").unwrap_or(0);
        panic!(
            "Envoy's config never changed as expected; near {at}: {}\nregistrar: {}",
            &dump[at.saturating_sub(1500)..(at + 200).min(dump.len())],
            crate::harness::dockerd::tail(&env.stack.log(), 15)
        );
    }
    watch.wait_served(20);
    let (ok, failures) = watch.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(ok > 5);
    let updated = env.stack.stat(in_place).unwrap_or(0);
    assert!(
        updated > updated0.unwrap_or(0),
        "listeners were not updated in place"
    );
    assert_eq!(env.stack.stat(removed), removed0, "a listener was removed");
}

fn spans_of<'a>(spans: &'a [Span], tag_service: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.tags.get("envoy_docker.service").map(String::as_str) == Some(tag_service))
        .collect()
}

#[test]
fn docker_11_tracing_to_otlp_and_zipkin_and_access_logs() {
    let mut env = dockerd::shared();
    let (web, api) = (free_port(), free_port());
    env.run(&[
        "-p",
        &format!("{web}:80"),
        "--name",
        "tr-web",
        "-l",
        "ServiceName=web",
        "-l",
        "EnvironmentName=prod",
        IMAGE,
    ]);
    env.run(&[
        "-p",
        &format!("{api}:80"),
        "--name",
        "tr-api",
        "-l",
        "ServiceName=api",
        IMAGE,
    ]);
    let log = env.root.join("access.log");

    // OpenTelemetry, turned on in a running system, with access logs.
    let otlp = Otlp::start();
    let extra = vec![
        "--tracing".to_string(),
        format!("otlp={}", otlp.addr),
        "--access-log".into(),
        log.display().to_string(),
    ];
    // (Envoy's /config_dump also lists every built-in extension, tracers
    // included, so only strings of our own config tell.)
    restart_with(&mut env, &[web, api], &extra, |c| {
        c.contains("\"service_name\": \"web-prod\"")
    });
    for i in 0..10 {
        assert_eq!(http_get(local(web), &format!("/?w{i}")).unwrap().0, 200);
        assert_eq!(http_get(local(api), &format!("/?a{i}")).unwrap().0, 200);
    }
    let got = wait_until(Duration::from_secs(15), || {
        let s = otlp.spans();
        !spans_of(&s, "web").is_empty() && !spans_of(&s, "api").is_empty()
    });
    assert!(got, "spans received: {:#?}", otlp.spans());
    let spans = otlp.spans();
    let w = spans_of(&spans, "web")[0];
    assert_eq!(w.service, "web-prod", "service.name of the web container");
    assert_eq!(w.name, "web-prod", "the decorator names the operation");
    for (k, v) in [
        ("envoy_docker.environment", "prod".to_string()),
        ("envoy_docker.container", "tr-web".to_string()),
        ("envoy_docker.image", IMAGE.to_string()),
        ("envoy_docker.host_port", format!("0.0.0.0:{web}")),
    ] {
        assert_eq!(w.tags.get(k), Some(&v), "{k} in {:?}", w.tags);
    }
    let a = spans_of(&spans, "api")[0];
    assert_eq!(a.service, "api");
    assert_eq!(
        a.tags.get("envoy_docker.container").map(String::as_str),
        Some("tr-api")
    );
    assert!(
        !a.tags.contains_key("envoy_docker.environment"),
        "no label, no tag"
    );

    // One request, one access-log line naming its container.
    assert_eq!(http_get(local(web), "/?one-logged-request").unwrap().0, 200);
    let lines: Vec<serde_json::Value> = {
        let mut found = Vec::new();
        wait_until(Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            found = text
                .lines()
                .filter(|l| l.contains("/?one-logged-request"))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            !found.is_empty()
        });
        found
    };
    assert_eq!(
        lines.len(),
        1,
        "{lines:?} in {}:\n{}",
        log.display(),
        crate::harness::dockerd::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 5)
    );
    let line = &lines[0];
    assert_eq!(line["service"], "web-prod");
    assert_eq!(line["environment"], "prod");
    assert_eq!(line["container"], "tr-web");
    assert_eq!(line["status"], 200);
    assert!(line["duration_ms"].is_number(), "{line}");

    // Zipkin: one service name for Envoy, the container's in the tags.
    let zipkin = Zipkin::start();
    let extra = vec!["--tracing".to_string(), format!("zipkin={}", zipkin.addr)];
    restart_with(&mut env, &[web, api], &extra, |c| {
        c.contains("\"collector_endpoint\": \"/api/v2/spans\"")
    });
    for i in 0..10 {
        assert_eq!(http_get(local(web), &format!("/?z{i}")).unwrap().0, 200);
    }
    assert!(
        wait_until(Duration::from_secs(15), || !spans_of(
            &zipkin.spans(),
            "web"
        )
        .is_empty()),
        "zipkin spans: {:#?}",
        zipkin.spans()
    );
    let spans = zipkin.spans();
    let z = spans_of(&spans, "web")[0];
    assert_eq!(
        z.service, "envoy-docker",
        "Zipkin's service is the node cluster"
    );
    assert_eq!(
        z.tags.get("envoy_docker.container").map(String::as_str),
        Some("tr-web")
    );
    assert_eq!(
        z.tags.get("envoy_docker.environment").map(String::as_str),
        Some("prod")
    );
    assert_eq!(
        z.tags.get("envoy_docker.image").map(String::as_str),
        Some(IMAGE)
    );
    assert_eq!(
        z.tags.get("envoy_docker.host_port"),
        Some(&format!("0.0.0.0:{web}"))
    );

    // And off again, in place too.
    restart_with(&mut env, &[web, api], &[], |c| {
        !c.contains("envoy_docker_tracing") && !c.contains("collector_endpoint")
    });
}

/// Runs `promtool check metrics` on `text`: (exit code, stderr). Exit 1 is
/// a parse error; 3 means it parsed but has lint findings.
fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// The value of one sample line (`name{labels} value`) in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn docker_12_metrics_parse_and_move_and_admin_matches_status() {
    let env = dockerd::shared();
    let admin = env.stack.registrar_admin;
    let metrics = || admin_get(admin, "/metrics");
    let before = metrics();
    let (code, problems) = promtool(&before);
    assert_eq!(code, 0, "registrar /metrics: {problems}");

    let (h, t) = (free_port(), free_port());
    env.run(&["-p", &format!("{h}:80"), "-l", "ServiceName=m-http", IMAGE]);
    let tcp = env.run(&[
        "-p",
        &format!("{t}:80"),
        "-l",
        "ServiceName=m-tcp",
        "-l",
        "ProxyMode=tcp",
        IMAGE,
    ]);
    for p in [h, t] {
        assert_eq!(http_get(local(p), "/").unwrap().0, 200);
    }

    // Envoy's stats: they parse, and each container has its series.
    let prom = admin_get(env.stack.admin, "/stats/prometheus");
    let (code, problems) = promtool(&prom);
    assert_ne!(
        code, 1,
        "Envoy's /stats/prometheus does not parse: {problems}"
    );
    for series in [
        format!("envoy_http_conn_manager_prefix=\"m-http_tcp_0-0-0-0_{h}\""),
        format!("envoy_tcp_prefix=\"m-tcp_tcp_0-0-0-0_{t}\""),
        format!("envoy_cluster_name=\"m-http_tcp_0-0-0-0_{h}\""),
        format!("envoy_cluster_name=\"m-tcp_tcp_0-0-0-0_{t}\""),
    ] {
        assert!(prom.contains(&series), "no {series}");
    }

    // The registrar's counters move with the mappings.
    let mid = metrics();
    assert_eq!(promtool(&mid).0, 0);
    let reg = "envoy_docker_registrations_total";
    assert_eq!(
        sample(&mid, reg) - sample(&before, reg),
        4.0,
        "2 ports x 2 families"
    );
    let ready = "envoy_docker_registration_ready_seconds_count";
    assert!(sample(&mid, ready) >= sample(&before, ready) + 4.0);
    assert!(sample(&mid, "envoy_docker_xds_acks_total{type=\"LDS\"}") > 0.0);
    assert!(sample(&mid, "envoy_docker_docker_events_total") >= 2.0);
    assert_eq!(sample(&mid, "envoy_docker_envoys_connected"), 1.0);
    assert_eq!(
        sample(
            &mid,
            "envoy_docker_mappings{proto=\"tcp\",state=\"active\"}"
        ),
        4.0
    );
    assert!(env.docker(&["rm", "-f", &tcp]).status.success());
    let after = metrics();
    let dereg = "envoy_docker_deregistrations_total";
    assert_eq!(sample(&after, dereg) - sample(&mid, dereg), 2.0);
    assert_eq!(
        sample(
            &after,
            "envoy_docker_mappings{proto=\"tcp\",state=\"active\"}"
        ),
        2.0
    );

    // /healthz and /mappings agree with status --json.
    let health: serde_json::Value = serde_json::from_str(&admin_get(admin, "/healthz")).unwrap();
    assert_eq!(health["status"], "serving");
    assert_eq!(health["mappings"], 2);
    let mappings: serde_json::Value = serde_json::from_str(&admin_get(admin, "/mappings")).unwrap();
    assert_eq!(mappings, serde_json::Value::Array(env.stack.status()));
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            cur.push(c);
        } else {
            let label =
                cur.ends_with("_prefix") || cur.ends_with("_name") || cur.ends_with("_class");
            if cur.starts_with("envoy_") && !label {
                names.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    names
}

#[test]
fn docker_13_examples_are_valid_and_the_dashboard_reads_real_series() {
    let env = dockerd::shared();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(root.join("examples/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let (h, t) = (free_port(), free_port());
    env.run(&[
        "-p",
        &format!("{h}:80"),
        "-l",
        "ServiceName=dash-http",
        IMAGE,
    ]);
    env.run(&[
        "-p",
        &format!("{t}:80"),
        "-l",
        "ServiceName=dash-tcp",
        "-l",
        "ProxyMode=tcp",
        IMAGE,
    ]);
    for p in [h, t] {
        assert_eq!(http_get(local(p), "/").unwrap().0, 200);
    }
    let envoy = admin_get(env.stack.admin, "/stats/prometheus");
    let registrar = {
        let (code, body) = env.stack.registrar_get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    };
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("examples/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 5);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                let found = [&envoy, &registrar].iter().any(|text| {
                    text.lines().any(|l| {
                        l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))
                    })
                });
                assert!(
                    found,
                    "panel {:?} reads {name}, which no one exports",
                    panel["title"]
                );
            }
        }
    }
}
