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

use crate::common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::Served;
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

/// Starts `imgfunc serve` on `data` with the rules in `functions`, under
/// the filter, with `extra` arguments; `None` when this machine refuses
/// the filter (no seccomp filters in the kernel, or a container that
/// forbids them).
fn serve_filtered(data: &Path, functions: &Path, extra: &[&str]) -> Option<Served> {
    let filter = kill_cachestat();
    // Raw pointers are not `Send`, which `pre_exec` asks of its closure.
    let (address, len) = (filter.as_ptr() as usize, filter.len() as u16);
    let mut command = common::serve_command(data, functions, extra);
    // SAFETY: between fork and exec the closure only makes `setrlimit` and
    // `prctl` calls on values on its stack and on `filter`, which the
    // child's copy of this process holds (it is dropped here only after
    // the spawn); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len,
                filter: address as *mut libc::sock_filter,
            };
            // The control's kill would otherwise leave a core dump.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let zero: libc::c_ulong = 0;
            if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0
                || libc::prctl(
                    libc::PR_SET_NO_NEW_PRIVS,
                    1 as libc::c_ulong,
                    zero,
                    zero,
                    zero,
                ) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let served = match Served::spawn(&mut command) {
        Ok(served) => served,
        // Refused by the machine: no seccomp filters in this kernel, or a
        // container's own filter forbids installing one. Anything else
        // (a malformed program) is this test's fault.
        Err(e)
            if !seccomp_filters_available()
                || matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            eprintln!("skipped: this machine refuses the system call filter ({e})");
            return None;
        }
        Err(e) => panic!("cannot start imgfunc serve under the filter: {e}"),
    };
    drop(filter);
    Some(served)
}

/// Whether this kernel has seccomp (a `Seccomp:` line in the process
/// status).
fn seccomp_filters_available() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| status.lines().any(|l| l.starts_with("Seccomp:")))
        .unwrap_or(false)
}

/// A temporary folder where the local store asks `cachestat` about
/// sources: the system's temporary folder, or `/dev/shm` where that is
/// not one (an overlay in a container); `None` when neither is.
fn folder_where_the_store_asks() -> Option<tempfile::TempDir> {
    [std::env::temp_dir(), "/dev/shm".into()]
        .into_iter()
        .filter(|base| store_asks_the_page_cache(base))
        .find_map(|base| tempfile::tempdir_in(base).ok())
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
    // Elsewhere the store never asks, with or without the flag, and
    // neither half would test anything.
    let Some(dir) = folder_where_the_store_asks() else {
        eprintln!(
            "skipped: neither the temporary folder nor /dev/shm is on ext2/3/4, XFS, Btrfs or tmpfs"
        );
        return;
    };
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
    // soon as it asks about the source.
    let data = dir.path().join("without-flag");
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
