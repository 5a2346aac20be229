//! Helpers shared by the integration tests. Each test binary uses only some
//! of them, so unused ones are not warnings.
#![allow(dead_code)]

pub mod host;
pub mod s3;

/// A spawned `imgfunc serve` and the address it listens on; killed when
/// dropped.
pub struct Served {
    pub child: std::process::Child,
    pub base: String,
}

impl Served {
    /// Spawns `command` (`imgfunc serve` logging at info to a piped stderr)
    /// and waits for the address it listens on.
    pub fn spawn(command: &mut std::process::Command) -> std::io::Result<Served> {
        let mut child = command.spawn()?;
        let base = served_base(&mut child);
        Ok(Served { child, base })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a spawned `imgfunc serve` listens on, from the "serving"
/// line of its log (RUST_LOG at info, stderr piped), as `http://ADDR`. The
/// whole log is read, so that the server never blocks on a full pipe, and
/// passed on to the test's output, shown when it fails.
fn served_base(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().expect("piped stderr");
    let (found, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("imgfunc serve: {line}");
            if let Some(rest) = line.split("addr=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = found.send(addr);
            }
        }
    });
    let addr = addr
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("imgfunc serve logs the address it listens on");
    format!("http://{addr}")
}
