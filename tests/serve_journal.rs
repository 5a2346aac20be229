//! `imgfunc serve` run as the real binary and killed (SIGKILL) with a
//! backlog of invocations: started again on the same folder, it runs every
//! invocation the killed process had accepted and not finished.

#![cfg(unix)]

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Served;
use common::host::{Behaviour, Receiver};

const UPLOADS: usize = 12;

/// `imgfunc serve` on `dir` with one image thread and a rule that makes a
/// large WebP of every upload to `photos`, slow enough to leave a backlog.
fn start(dir: &Path) -> Served {
    start_with(
        dir,
        serde_json::json!({
            "id": "big",
            "event_types": ["create_object"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_2400|format:t_webp,q_90",
                               "save_bucket": "out"}
        }),
        &[],
    )
}

/// `imgfunc serve` on `dir` with one image thread, `extra` arguments and
/// `rule` (written to its functions folder, replacing any before) on
/// bucket `photos`.
fn start_with(dir: &Path, rule: serde_json::Value, extra: &[&str]) -> Served {
    let functions = dir.join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    std::fs::write(
        functions.join("rule.json"),
        serde_json::json!({"bucket": "photos", "notifications": [rule]}).to_string(),
    )
    .unwrap();
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(extra);
    let mut command = common::serve_command(&dir.join("data"), &functions, &args);
    Served::spawn(&mut command).expect("start imgfunc serve")
}

/// The photo every upload here carries.
fn photo() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/images/wood.jpg"
    ))
    .unwrap()
}

/// PUTs `photo` as `photos/up/{name}`, answered 201.
async fn upload(client: &reqwest::Client, server: &Served, name: &str, photo: &[u8]) {
    let response = client
        .put(format!("{}/photos/up/{name}", server.base))
        .header("content-type", "image/jpeg")
        .body(photo.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{name}");
}

fn outputs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("data/out/gen_up"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".jpg"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `imgfunc serve` on `dir` (see [`start`]), with [`UPLOADS`] photos
/// uploaded to it.
async fn with_backlog(dir: &Path) -> Served {
    let (photo, client) = (photo(), reqwest::Client::new());
    let server = start(dir);
    for n in 0..UPLOADS {
        upload(&client, &server, &format!("{n:02}.jpg"), &photo).await;
    }
    server
}

/// Waits until every upload of [`with_backlog`] has its output.
async fn all_outputs(dir: &Path) {
    wait_until(
        240,
        || format!("{} of {UPLOADS} outputs", outputs(dir).len()),
        || outputs(dir).len() == UPLOADS,
    )
    .await;
}

#[tokio::test]
async fn invocations_a_killed_server_accepted_run_when_it_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = with_backlog(dir.path()).await;
    // Killed as soon as the first output is written, the rest still queued.
    wait_until(
        120,
        || "no output at all".into(),
        || !outputs(dir.path()).is_empty(),
    )
    .await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let before = outputs(dir.path()).len();
    assert!(
        before < UPLOADS,
        "the kill left nothing to do ({before} outputs)"
    );

    // Started again: every upload gets its output, each a whole WebP.
    let _server = start(dir.path());
    all_outputs(dir.path()).await;
    let expected: Vec<String> = (0..UPLOADS).map(|n| format!("{n:02}.jpg")).collect();
    assert_eq!(outputs(dir.path()), expected);
    for name in &expected {
        let bytes = std::fs::read(dir.path().join("data/out/gen_up").join(name)).unwrap();
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::WebP)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.width(), 2400, "{name}");
    }
}

/// Polls `ready` every few milliseconds for up to `secs` seconds; panics
/// with `what` (asked then) when it never holds.
async fn wait_until(secs: u64, what: impl Fn() -> String, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ready() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The journal's text, or "" before it exists.
fn journal(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("data/.imgfunc/pending.jsonl")).unwrap_or_default()
}

/// Waits until `journal` holds `count` start marks, then kills `server`.
async fn kill_once_started(dir: &Path, server: Served, count: usize) {
    kill_when(
        server,
        || format!("the job never started: {}", journal(dir)),
        || journal(dir).matches("\"op\":\"start\"").count() >= count,
    )
    .await;
}

/// Kills `server` (SIGKILL) once `ready` holds, within a minute.
async fn kill_when(mut server: Served, what: impl Fn() -> String, ready: impl Fn() -> bool) {
    wait_until(60, what, ready).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[tokio::test]
async fn a_job_that_stops_the_server_at_every_start_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let photo = photo();
    let client = reqwest::Client::new();
    // The server is killed while the job runs, as a job that made it abort
    // would stop it: at the upload, and at each of the next two starts,
    // once the job's start is written down.
    let mut server = start(dir.path());
    upload(&client, &server, "poison.jpg", &photo).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    // Queued again at start, it starts once with the others...
    kill_once_started(dir.path(), start(dir.path()), 1).await;
    // ...then alone, and a second start is marked.
    kill_once_started(dir.path(), start(dir.path()), 1).await;
    assert!(
        journal(dir.path()).contains("\"starts\":1"),
        "{}",
        journal(dir.path())
    );
    assert!(
        outputs(dir.path()).is_empty(),
        "the job finished before the server was killed: the test needs a slower one"
    );

    // Now it is set aside, kept in dropped.jsonl, and the server serves.
    let server = start(dir.path());
    upload(&client, &server, "next.jpg", &photo).await;
    wait_until(
        120,
        || "no output for the next upload".into(),
        || !outputs(dir.path()).is_empty(),
    )
    .await;
    assert_eq!(outputs(dir.path()), ["next.jpg"]);
    let dropped = std::fs::read_to_string(dir.path().join("data/.imgfunc/dropped.jsonl")).unwrap();
    assert_eq!(dropped.lines().count(), 1, "{dropped}");
    assert!(
        dropped.contains("up/poison.jpg") && dropped.contains("\"starts\":2"),
        "{dropped}"
    );
    drop(server);
}

/// A loopback TCP server that accepts connections and never answers; the
/// count of connections it took.
async fn silent_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr.to_string(), taken)
}

/// Waits until `taken` reaches `n`, then kills `server`.
async fn kill_once_connected(server: Served, taken: &AtomicUsize, n: usize) {
    kill_when(
        server,
        || "no connection came".into(),
        || taken.load(Ordering::SeqCst) >= n,
    )
    .await;
}

#[tokio::test]
async fn a_result_under_delivery_when_the_server_is_killed_is_delivered_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let rule = |notify: &str| {
        serde_json::json!({
            "id": "small",
            "event_types": ["create_object"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_100", "save_bucket": "out"},
            "notify_url": notify,
        })
    };
    // The receiver takes the result's POST and never answers: the job is
    // done but for its delivery when the server is killed.
    let (silent, taken) = silent_server().await;
    let server = start_with(dir.path(), rule(&format!("http://{silent}/hook")), &[]);
    upload(&client, &server, "a.jpg", &photo()).await;
    kill_once_connected(server, &taken, 1).await;
    assert_eq!(outputs(dir.path()), ["a.jpg"]);

    // Started again, with a receiver that answers: the job runs again and
    // its result arrives.
    let receiver = Receiver::start(Behaviour::Accept).await;
    let _server = start_with(dir.path(), rule(&receiver.url), &[]);
    let bodies = receiver.wait_for(1).await;
    assert_eq!(bodies[0]["status"], "ok", "{}", bodies[0]);
    assert_eq!(bodies[0]["event"]["key"], "up/a.jpg", "{}", bodies[0]);
    assert_eq!(
        bodies[0]["outputs"][0]["key"], "gen_up/a.jpg",
        "{}",
        bodies[0]
    );
}

#[tokio::test]
async fn a_job_killed_at_every_start_before_its_image_work_is_not_set_aside() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    // The rule's watermark host takes the fetch and never answers, so each
    // run of the job waits before its image work, and is killed there.
    let (silent, taken) = silent_server().await;
    let mark = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("http://{silent}/logo.png"));
    let rule = |action: &str| {
        serde_json::json!({
            "id": "marked",
            "event_types": ["create_object"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": action, "save_bucket": "out"},
        })
    };
    let hanging = rule(&format!("watermark_image:u_{mark}|resize:w_100"));
    let extra = [
        "--watermark-hosts",
        "127.0.0.1",
        "--watermark-allow-private",
    ];
    let server = start_with(dir.path(), hanging.clone(), &extra);
    upload(&client, &server, "a.jpg", &photo()).await;
    kill_once_connected(server, &taken, 1).await;
    for n in 2..=4 {
        let server = start_with(dir.path(), hanging.clone(), &extra);
        kill_once_connected(server, &taken, n).await;
    }
    assert!(
        !journal(dir.path()).contains("\"op\":\"start\""),
        "{}",
        journal(dir.path())
    );

    // With the watermark gone from the rule, the job runs and makes its
    // output: it was never set aside.
    let _server = start_with(dir.path(), rule("resize:w_100"), &[]);
    wait_until(
        60,
        || format!("no output: {}", journal(dir.path())),
        || !outputs(dir.path()).is_empty(),
    )
    .await;
    assert_eq!(outputs(dir.path()), ["a.jpg"]);
    assert!(!dir.path().join("data/.imgfunc/dropped.jsonl").exists());
}

#[tokio::test]
async fn events_the_journal_cannot_record_are_refused_and_the_server_serves_on() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let functions = dir.path().join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    std::fs::write(
        functions.join("rule.json"),
        serde_json::json!({"bucket": "photos", "notifications": [{
            "id": "small", "event_types": ["create_object"], "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_100", "save_bucket": "out"}}]})
        .to_string(),
    )
    .unwrap();
    let mut command = common::serve_command(&dir.path().join("data"), &functions, &[]);
    // Files may grow to 32 KiB, as if the disk filled up there: a write
    // past it fails with EFBIG (the signal it would also raise ignored).
    // SAFETY: only async-signal-safe calls, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 32 << 10,
                rlim_max: 32 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = Served::spawn(&mut command).expect("start imgfunc serve");
    let client = reqwest::Client::new();
    // Events for objects that do not exist: each job fails at once, and
    // the journal grows by its lines until it reaches the limit.
    let mut sent = 0;
    let refused = loop {
        let records: Vec<serde_json::Value> = (0..20)
            .map(|n| {
                serde_json::json!({"event_type": "create_object", "bucket_name": "photos",
                                   "object_key": format!("missing/{sent}-{n}.jpg")})
            })
            .collect();
        let mut accepted = 0;
        let mut refusal = None;
        for record in records {
            let response = client
                .post(format!("{}/v1/events", server.base))
                .json(&record)
                .send()
                .await
                .unwrap();
            if response.status() == 202 {
                accepted += 1;
            } else {
                refusal = Some(response);
                break;
            }
        }
        sent += accepted;
        if let Some(response) = refusal {
            break response;
        }
        assert!(sent < 2000, "the journal never filled up");
    };
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "journal_unavailable", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("pending.jsonl"), "{message}");
    assert!(message.contains("File too large"), "{message}");
    // Nothing the server refused is in the journal; what it took is.
    let journal = journal(dir.path());
    assert_eq!(
        journal.matches("\"op\":\"add\"").count(),
        sent,
        "{sent} taken"
    );
    // And it still answers.
    let health = client
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn a_second_signal_stops_the_drain_and_the_next_start_runs_what_was_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = with_backlog(dir.path()).await;
    let pid = i32::try_from(server.child.id()).unwrap();
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = server.child.wait().unwrap();
    // Stopped by the second signal, not at the end of the drain.
    assert_eq!(status.code(), Some(130));
    assert!(outputs(dir.path()).len() < UPLOADS);

    let _server = start(dir.path());
    all_outputs(dir.path()).await;
}

/// A key may hold a line break (S3 keys can, and an event sends it as
/// `%0A`): the log quotes it with the break escaped, so no key can write a
/// line of its own into the server's log.
#[tokio::test]
async fn a_key_cannot_forge_a_line_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let forged = "FORGED 2026-01-01T00:00:00Z INFO done";
    let key = format!("up/a.jpg%0A{}", forged.replace(' ', "+"));
    let event = serde_json::json!({"Records": [{
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": "photos"}, "object": {"key": key, "size": 10}}
    }]});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/events", server.base))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // The object is missing, so the invocation fails, and says so with its
    // key in the log.
    wait_until(
        60,
        || format!("the failure logged: {:?}", server.log_lines()),
        || {
            server
                .log_lines()
                .iter()
                .any(|l| l.contains("not_found") || l.contains("failed"))
        },
    )
    .await;
    let lines = server.log_lines();
    assert!(
        lines.iter().any(|l| l.contains(r"a.jpg\nFORGED")),
        "the key escaped: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("FORGED")),
        "a line of the key's: {lines:?}"
    );
}

/// A stop signal is logged when it arrives, not when the open requests
/// have drained: an upload that never ends holds the stop for the drain
/// timeout, and the log says meanwhile why the server is still up.
#[tokio::test]
async fn a_stop_signal_is_logged_at_once_while_a_request_holds_the_drain() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let address = server.base.trim_start_matches("http://").to_string();
    let mut upload = std::net::TcpStream::connect(&address).unwrap();
    upload
        .write_all(b"PUT /photos/slow.jpg HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = i32::try_from(server.child.id()).unwrap();
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_until(
        5,
        || format!("the stop logged: {:?}", server.log_lines()),
        || server.log_lines().iter().any(|l| l.contains("stopping:")),
    )
    .await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the open upload holds the drain"
    );
    drop(upload);
}

/// A full queue's 503 is a normal answer: logged once, at `warn`, with its
/// code, request id and path, and no `ERROR` line (an alert on errors must
/// not fire on back-pressure).
#[tokio::test]
async fn a_full_queue_is_logged_as_a_warning_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let rule = serde_json::json!({
        "id": "big",
        "event_types": ["create_object"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_2400|format:t_webp,q_90", "save_bucket": "out"}
    });
    let server = start_with(dir.path(), rule, &["--queue", "1"]);
    let (photo, client) = (photo(), reqwest::Client::new());
    let mut refused = None;
    for n in 0..60 {
        let response = client
            .put(format!("{}/photos/up/{n:02}.jpg", server.base))
            .body(photo.clone())
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            refused = Some(n);
            break;
        }
        assert_eq!(response.status(), 201, "{n}");
    }
    let n = refused.expect("a PUT refused while the queue is full");
    let path = format!("path=\"/photos/up/{n:02}.jpg\"");
    wait_until(
        5,
        || format!("the refusal logged: {:?}", server.log_lines()),
        || {
            server
                .log_lines()
                .iter()
                .any(|l| l.contains("WARN") && l.contains("queue_full") && l.contains(&path))
        },
    )
    .await;
    let lines = server.log_lines();
    assert!(!lines.iter().any(|l| l.contains("ERROR")), "{lines:?}");
}
