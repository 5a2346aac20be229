//! `imgfunc serve` run as the real binary inside a system call filter that
//! kills the process for `cachestat`, as some sandboxes do for calls they
//! do not list: with `--no-page-cache-check` it still makes thumbnails;
//! without it, the same filter kills it on the first source it reads,
//! which shows that the filter works and that the flag is what keeps the
//! server alive.

#![cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::host::{decoded, eventually, fixture};

/// `cachestat`'s number on the architectures this test runs on.
const SYS_CACHESTAT: u32 = 451;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// A seccomp program: kill the process for `cachestat`, allow the rest.
fn kill_cachestat() -> Vec<libc::sock_filter> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    vec![
        // seccomp_data.arch: another architecture's calls are let through.
        stmt(load, 4),
        jump(AUDIT_ARCH, 0, 3),
        // seccomp_data.nr
        stmt(load, 0),
        jump(SYS_CACHESTAT, 0, 1),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// A running `imgfunc serve` and the address it listens on.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `imgfunc serve` on `data` with the rules in `functions`, under
/// the filter, with `extra` arguments; `None` when the kernel refuses the
/// filter (no seccomp here).
fn serve_filtered(data: &Path, functions: &Path, extra: &[&str]) -> Option<Server> {
    let filter = kill_cachestat();
    // Raw pointers are not `Send`, which `pre_exec` asks of its closure.
    let (address, len) = (filter.as_ptr() as usize, filter.len() as u16);
    let mut command = Command::new(env!("CARGO_BIN_EXE_imgfunc"));
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
    // SAFETY: between fork and exec the closure only makes two `prctl`
    // calls, on `filter`, which the child's copy of this process holds
    // (it is dropped here only after the spawn); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len,
                filter: address as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("skipped: the kernel refused the system call filter ({e})");
            return None;
        }
    };
    drop(filter);
    // The address is in the "serving" line; the rest of the log is read
    // (and dropped) so that the server never blocks on a full pipe.
    let stderr = child.stderr.take().expect("piped stderr");
    let (found, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = found.send(addr);
            }
        }
    });
    let addr = addr
        .recv_timeout(Duration::from_secs(60))
        .expect("imgfunc serve logs the address it listens on");
    Some(Server {
        child,
        base: format!("http://{addr}"),
    })
}

/// Whether the local store asks `cachestat` about sources under `path`:
/// it does on ext2/3/4, XFS, Btrfs and tmpfs only.
fn store_asks_the_page_cache(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: `statfs` is plain data, for which all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a writable statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return false;
    }
    matches!(
        stat.f_type,
        libc::EXT4_SUPER_MAGIC
            | libc::XFS_SUPER_MAGIC
            | libc::BTRFS_SUPER_MAGIC
            | libc::TMPFS_MAGIC
    )
}

/// A folder with one rule: every object put in `photos` gets a 64 pixel
/// wide PNG in `thumbs`.
fn rules(dir: &Path) -> std::path::PathBuf {
    let functions = dir.join("functions");
    std::fs::create_dir(&functions).unwrap();
    let rule = serde_json::json!({
        "bucket": "photos",
        "notifications": [{
            "id": "thumbs",
            "event_types": ["create_object"],
            "object_filters": ["*"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_64|format:t_png", "save_bucket": "thumbs"},
        }],
    });
    std::fs::write(functions.join("thumbs.json"), rule.to_string()).unwrap();
    functions
}

async fn put_photo(client: &reqwest::Client, base: &str) -> reqwest::Result<reqwest::Response> {
    client
        .put(format!("{base}/photos/storm.jpg"))
        .header("content-type", "image/jpeg")
        .body(fixture("images/storm.jpg"))
        .send()
        .await
}

#[tokio::test]
async fn without_the_page_cache_check_a_sandbox_that_forbids_cachestat_still_gets_thumbnails() {
    let dir = tempfile::tempdir().unwrap();
    let functions = rules(dir.path());
    let client = reqwest::Client::new();

    let data = dir.path().join("with-flag");
    let Some(mut server) = serve_filtered(&data, &functions, &["--no-page-cache-check"]) else {
        return;
    };
    let put = put_photo(&client, &server.base).await.unwrap();
    assert_eq!(put.status(), 201);
    let url = format!("{}/thumbs/gen_storm.jpg", server.base);
    let thumb = eventually("the thumbnail", || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let res = client.get(&url).send().await.ok()?;
            if res.status() != 200 {
                return None;
            }
            res.bytes().await.ok()
        }
    })
    .await;
    let (format, width, _) = decoded(&thumb);
    assert_eq!((format.as_str(), width), ("png", 64));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server stopped"
    );

    // The control: without the flag the same filter kills the server as
    // soon as it asks about the source, where the store asks at all.
    let data = dir.path().join("without-flag");
    std::fs::create_dir(&data).unwrap();
    if !store_asks_the_page_cache(&data) {
        eprintln!("control skipped: the store does not ask about sources on this filesystem");
        return;
    }
    let Some(mut server) = serve_filtered(&data, &functions, &[]) else {
        return;
    };
    // The upload may be answered or cut off by the kill: either way the
    // event is already queued.
    let _ = put_photo(&client, &server.base).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server without the flag outlived the filter"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}
