//! Helpers shared by the integration tests.

pub mod host;
pub mod s3;

/// `imgfunc serve` on 127.0.0.1:0 with the store at `data`, the rules in
/// `functions` and `extra` arguments, logging at info to a piped stderr
/// (as [`Served::spawn`] reads it). Its settings come from its arguments
/// alone: an `IMGFUNC_NO_PAGE_CACHE_CHECK` or `IMGFUNC_S3_ENDPOINT` in the
/// test's environment would change what is tested.
pub fn serve_command(
    data: &std::path::Path,
    functions: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    use std::process::Stdio;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_imgfunc"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .arg("--functions")
        .arg(functions)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IMGFUNC_") {
            command.env_remove(name);
        }
    }
    command
}

/// A spawned `imgfunc serve` and the address it listens on; killed when
/// dropped.
pub struct Served {
    pub child: std::process::Child,
    pub base: String,
    /// Every line of its log so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    /// Spawns `command` (`imgfunc serve` logging at info to a piped stderr)
    /// and waits for the address it listens on.
    pub fn spawn(command: &mut std::process::Command) -> std::io::Result<Served> {
        // Made first, so that a server that never says where it listens is
        // killed when the wait for it panics.
        let mut served = Served {
            child: command.spawn()?,
            base: String::new(),
            log: std::sync::Arc::default(),
        };
        served.base = served_base(&mut served.child, std::sync::Arc::clone(&served.log));
        Ok(served)
    }

    /// The log's lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
/// passed on to the test's output, shown when it fails, and kept in `log`.
fn served_base(
    child: &mut std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().expect("piped stderr");
    let (found, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("imgfunc serve: {line}");
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.clone());
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
