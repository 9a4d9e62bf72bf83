//! envoy-docker: a multi-call binary that replaces docker-proxy so that
//! Envoy serves every published TCP port.
//!
//! Data flows dockerd → `proxy` → `protocol` → `registrar` state → `xds`
//! resources → Envoy. `resync`, `status` and `bootstrap` are small tools
//! around that path.

pub mod addr;
pub mod applet;
pub mod bootstrap;
pub mod ca;
pub mod catalog;
pub mod cli;
pub mod cmdline;
pub mod etcd;
pub mod fdlimit;
pub mod install;
pub mod logging;
pub mod mapping;
pub mod mesh;
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
use std::process::ExitCode;

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

/// Why a role failed, by role; each says what went wrong in its own
/// terms, with the cause under it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("serve")]
    Serve(#[from] registrar::Error),
    #[error("status")]
    Status(#[from] status::Error),
    #[error("resync")]
    Resync(#[from] resync::Error),
    #[error("install")]
    Install(#[from] install::Error),
    #[error("ca")]
    Ca(#[from] ca::Error),
    #[error("bootstrap")]
    Bootstrap(#[from] bootstrap::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// One line: the error and its causes, outermost first.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // `#[error(transparent)]` and wrappers repeat their cause's text.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// The one runtime a role needs: the registrar's two workers, or one
/// thread for the proxy and the short-lived tools.
fn runtime(multi: bool) -> Result<tokio::runtime::Runtime, Error> {
    let mut b = if multi {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        let mut b = tokio::runtime::Builder::new_current_thread();
        // A settled proxy gives back its code pages just before it sleeps.
        b.on_thread_park(proxy::trim::before_sleep);
        b
    };
    b.enable_all().build().map_err(Error::Runtime)
}

/// Runs the role that argv asks for; returns the exit status. A failed
/// role is printed once, with its cause chain.
pub fn run(argv: Vec<OsString>) -> ExitCode {
    let (applet, args) = match applet::dispatch(&argv) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("envoy-docker: {e}");
            return ExitCode::from(2);
        }
    };
    if !matches!(applet, Applet::Proxy | Applet::Serve) {
        quiet_on_closed_stdout();
    }
    match role(applet, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("envoy-docker {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn role(applet: Applet, args: Vec<OsString>) -> Result<ExitCode, Error> {
    let usage_error = |e: String| {
        eprintln!("envoy-docker: {e}");
        Ok(ExitCode::from(2))
    };
    macro_rules! parsed {
        ($parse:expr, $applet:expr) => {
            match $parse(args) {
                Ok(Parsed::Run(a)) => a,
                Ok(Parsed::Help) => {
                    println!("{}", cli::help_for($applet));
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return usage_error(e),
            }
        };
    }
    match applet {
        Applet::Proxy => match proxy::prepare(&args) {
            Ok(p) => match runtime(false) {
                Ok(rt) => Ok(rt.block_on(p.serve())),
                Err(e) => Ok(p.fail(&format!("cannot start: {}", chain(&e)))),
            },
            Err(code) => Ok(code),
        },
        Applet::Serve => {
            let a = parsed!(cli::serve, Applet::Serve);
            Ok(runtime(true)?.block_on(registrar::main(a))?)
        }
        Applet::Resync => {
            let a = parsed!(cli::resync, Applet::Resync);
            Ok(runtime(false)?.block_on(resync::run(a))?)
        }
        Applet::Status => {
            let a = parsed!(cli::status, Applet::Status);
            Ok(runtime(false)?.block_on(status::run(a))?)
        }
        Applet::Bootstrap => Ok(bootstrap::run(parsed!(cli::bootstrap, Applet::Bootstrap))?),
        Applet::Install => Ok(install::run(parsed!(cli::install, Applet::Install))?),
        Applet::Ca => Ok(ca::run(parsed!(cli::ca, Applet::Ca))?),
        Applet::Version => {
            println!("{}", version::line());
            Ok(ExitCode::SUCCESS)
        }
        Applet::Help => match args.first().map(|a| a.to_string_lossy().into_owned()) {
            None => {
                println!("{}", cli::MAIN_HELP);
                Ok(ExitCode::SUCCESS)
            }
            Some(sub) => match Applet::from_subcommand(&sub) {
                Some(a) => {
                    println!("{}", cli::help_for(a));
                    Ok(ExitCode::SUCCESS)
                }
                None => usage_error(format!("no help for unknown subcommand {sub:?}")),
            },
        },
    }
}
