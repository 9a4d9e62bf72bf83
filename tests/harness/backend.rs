//! Backends on 127.0.0.x standing in for containers: an HTTP server that
//! answers every request with a fixed body, and a UDP echo server. Both run
//! on threads until the test process ends.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};

/// Serves `body` to every HTTP/1.1 request, with keep-alive.
pub fn http(ip: &str, body: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let body = body.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut close = false;
                    let mut line = String::new();
                    // Request line and headers; bodies are not expected.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line.to_ascii_lowercase().starts_with("connection: close") {
                            close = true;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    if conn.write_all(reply.as_bytes()).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Echoes every datagram back to its sender.
pub fn udp_echo(ip: &str) -> SocketAddr {
    let sock = UdpSocket::bind((ip, 0)).unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    addr
}
