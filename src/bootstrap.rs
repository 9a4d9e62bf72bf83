//! `envoy-docker bootstrap`: prints (or writes, atomically) the Envoy
//! bootstrap that `xds::bootstrap` renders.

use crate::xds::bootstrap::{render, Bootstrap};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub bootstrap: Bootstrap,
    /// Write here instead of stdout.
    pub output: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

pub fn run(args: Config) -> Result<ExitCode, Error> {
    let yaml = render(&args.bootstrap);
    let Some(path) = &args.output else {
        print!("{yaml}");
        return Ok(ExitCode::SUCCESS);
    };
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, yaml)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Write(path.clone(), e))?;
    Ok(ExitCode::SUCCESS)
}
