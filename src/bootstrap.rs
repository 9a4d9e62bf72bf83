//! `envoy-docker bootstrap`: prints (or writes, atomically) the Envoy
//! bootstrap that `xds::bootstrap` renders.

use crate::xds::bootstrap::{render, Bootstrap};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub bootstrap: Bootstrap,
    /// Write here instead of stdout.
    pub output: Option<PathBuf>,
}

pub fn run(args: Config) -> i32 {
    let yaml = render(&args.bootstrap);
    let Some(path) = &args.output else {
        print!("{yaml}");
        return 0;
    };
    let tmp = path.with_extension("yaml.tmp");
    match std::fs::write(&tmp, yaml).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "envoy-docker bootstrap: cannot write {}: {e}",
                path.display()
            );
            1
        }
    }
}
