//! envoy-docker: a multi-call binary that replaces docker-proxy so that
//! Envoy serves every published TCP port.
//!
//! Data flows dockerd → `proxy` → `protocol` → `registrar` state → `xds`
//! resources → Envoy. `resync`, `status` and `bootstrap` are small tools
//! around that path.

pub mod addr;
pub mod applet;
pub mod bootstrap;
pub mod catalog;
pub mod cli;
pub mod cmdline;
pub mod etcd;
pub mod fdlimit;
pub mod install;
pub mod logging;
pub mod mapping;
pub mod nft;
pub mod procscan;
pub mod protocol;
pub mod proxy;
pub mod registrar;
pub mod resync;
pub mod status;
pub mod version;
pub mod xds;

use applet::Applet;
use cli::Parsed;
use std::ffi::OsString;

/// Printing roles end quietly, as other command-line tools do, when the
/// reader of their output goes away (`envoy-docker status | head -1`). The
/// proxy and the registrar keep ignoring SIGPIPE: a peer that closes a
/// socket must not kill them.
fn quiet_on_closed_stdout() {
    // SAFETY: resets one signal's disposition before any thread starts.
    unsafe {
        nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_DFL);
    }
}

/// Runs the role that argv asks for; returns the exit status.
pub fn run(argv: Vec<OsString>) -> i32 {
    let (applet, args) = match applet::dispatch(&argv) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("envoy-docker: {e}");
            return 2;
        }
    };
    if !matches!(applet, Applet::Proxy | Applet::Serve) {
        quiet_on_closed_stdout();
    }
    let usage_error = |e: String| {
        eprintln!("envoy-docker: {e}");
        2
    };
    macro_rules! sub {
        ($parse:expr, $applet:expr, $run:expr) => {
            match $parse(args) {
                Ok(Parsed::Run(a)) => $run(a),
                Ok(Parsed::Help) => {
                    println!("{}", cli::help_for($applet));
                    0
                }
                Err(e) => usage_error(e),
            }
        };
    }
    match applet {
        Applet::Proxy => proxy::run(&args),
        Applet::Serve => sub!(cli::serve, Applet::Serve, registrar::main),
        Applet::Resync => sub!(cli::resync, Applet::Resync, resync::run),
        Applet::Bootstrap => sub!(cli::bootstrap, Applet::Bootstrap, bootstrap::run),
        Applet::Status => sub!(cli::status, Applet::Status, status::run),
        Applet::Install => sub!(cli::install, Applet::Install, install::run),
        Applet::Version => {
            println!("{}", version::line());
            0
        }
        Applet::Help => match args.first().map(|a| a.to_string_lossy().into_owned()) {
            None => {
                println!("{}", cli::MAIN_HELP);
                0
            }
            Some(sub) => match Applet::from_subcommand(&sub) {
                Some(a) => {
                    println!("{}", cli::help_for(a));
                    0
                }
                None => usage_error(format!("no help for unknown subcommand {sub:?}")),
            },
        },
    }
}
