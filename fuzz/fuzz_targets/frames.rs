//! Any bytes on the registrar socket: the frame decoder, then the very
//! connection handler the registrar runs (handshake included), on a real
//! Unix socket pair. Nothing may panic, and the registry stays usable.
#![no_main]

use envoy_docker::mapping::Mode;
use envoy_docker::protocol::{decode_frame, Reply, Request};
use envoy_docker::registrar::keeper::{self, Read};
use envoy_docker::registrar::socket::serve_connection;
use envoy_docker::registrar::state::Registry;
use envoy_docker::procscan::Trust;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    // The pure decoder, frame after frame, both ways.
    let mut rest = data;
    while let Ok(Some((_, used))) = decode_frame::<Request>(rest) {
        rest = &rest[used..];
    }
    let _ = decode_frame::<Reply>(data);

    // The registrar's handler, fed the bytes by a peer that then hangs up.
    runtime().block_on(async {
        let registry = Registry::new(Mode::Http);
        let (registrar, inputs) = keeper::handle(&registry);
        let (_stop, stop) = tokio::sync::watch::channel(false);
        let owner = tokio::spawn(keeper::run(registry, inputs, stop));
        let trust = Trust::new(None);
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let feed = async move {
            let _ = theirs.write_all(data).await;
            let _ = theirs.shutdown().await;
            // Keep reading replies until the registrar closes.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut sink).await;
        };
        let serve = serve_connection(ours, 1, &registrar, None, &trust);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            tokio::join!(feed, serve)
        })
        .await;
        // Whatever was registered went with the connection.
        let left = registrar.ask(Read::List).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
        owner.abort();
    });
});
