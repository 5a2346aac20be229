//! Deliveries against real HTTP receivers on 127.0.0.1.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use super::*;

/// A receiver that answers its n-th request with `statuses[n]` (the last
/// status repeats) and keeps the payloads it accepted.
struct Receiver {
    statuses: Vec<u16>,
    calls: AtomicUsize,
    accepted: Mutex<Vec<Value>>,
}

async fn hook(
    State(receiver): State<Arc<Receiver>>,
    Json(body): Json<Value>,
) -> (StatusCode, &'static str) {
    let n = receiver.calls.fetch_add(1, Ordering::SeqCst);
    let code = receiver
        .statuses
        .get(n)
        .or(receiver.statuses.last())
        .copied()
        .unwrap_or(200);
    let status = StatusCode::from_u16(code).unwrap();
    if status.is_success() {
        receiver.accepted.lock().unwrap().push(body);
    }
    (status, "receiver says no")
}

async fn receiver(statuses: &[u16]) -> (String, Arc<Receiver>) {
    let receiver = Arc::new(Receiver {
        statuses: statuses.to_vec(),
        calls: AtomicUsize::new(0),
        accepted: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Arc::clone(&receiver));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), receiver)
}

/// Accepts connections and never answers; counts the connections.
async fn silent_receiver() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (format!("http://{addr}/hook"), connections)
}

/// A URL on a port nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/hook")
}

fn config(dir: &Path) -> NotifyConfig {
    NotifyConfig {
        attempts: 3,
        timeout: Duration::from_millis(200),
        delay: Duration::from_millis(20),
        dead_letter: dir.join("state/dead-letter.jsonl"),
        max_in_flight: DEFAULT_MAX_IN_FLIGHT,
    }
}

/// A notifier that tries each delivery once.
fn one_attempt(dir: &Path) -> Arc<Notifier> {
    let config = NotifyConfig {
        attempts: 1,
        ..config(dir)
    };
    Arc::new(Notifier::new(config).unwrap())
}

fn dead_letters(config: &NotifyConfig) -> Vec<Value> {
    match std::fs::read_to_string(&config.dead_letter) {
        Ok(text) => text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn payload() -> Value {
    json!({"rule": "thumbs", "status": "ok",
           "event": {"bucket": "photos", "key": "photos/水 印.jpg", "type": "create_object"},
           "outputs": [{"bucket": "photos", "key": "gen_photos/水 印.jpg", "bytes": 1234}]})
}

#[tokio::test]
async fn fails_once_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = receiver(&[500, 200]).await;
    let notifier = Notifier::new(config(dir.path())).unwrap();

    let delivery = notifier.deliver(&url, &payload()).await.unwrap();
    assert_eq!(
        delivery,
        Delivery {
            attempts: 2,
            status: StatusCode::OK
        }
    );
    assert_eq!(*receiver.accepted.lock().unwrap(), [payload()]);
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 2);
    assert!(dead_letters(notifier.config()).is_empty());
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = receiver(&[503, 429, 204]).await;
    let notifier = Notifier::new(config(dir.path())).unwrap();
    let delivery = notifier.deliver(&url, &payload()).await.unwrap();
    assert_eq!(
        delivery,
        Delivery {
            attempts: 3,
            status: StatusCode::NO_CONTENT
        }
    );
    assert_eq!(receiver.accepted.lock().unwrap().len(), 1);

    let (url, _) = self::receiver(&[408, 200]).await;
    assert_eq!(
        notifier.deliver(&url, &payload()).await.unwrap().attempts,
        2
    );
}

#[tokio::test]
async fn silent_receiver_is_dead_lettered_after_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (url, connections) = silent_receiver().await;
    let notifier = Notifier::new(config(dir.path())).unwrap();

    let err = notifier.deliver(&url, &payload()).await.unwrap_err();
    let NotifyError::Failed {
        attempts,
        last_error,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*attempts, 3);
    assert_eq!(last_error, "no response within 200ms");
    assert_eq!(
        err.to_string(),
        format!("notify {url}: failed after 3 attempt(s): no response within 200ms")
    );
    assert_eq!(connections.load(Ordering::SeqCst), 3);

    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["url"], url);
    assert_eq!(letter["attempts"], 3);
    assert_eq!(letter["last_error"], "no response within 200ms");
    assert_eq!(letter["payload"], payload());
    assert!(letter["time"].as_str().unwrap().ends_with('Z'), "{letter}");
}

#[tokio::test]
async fn client_error_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (url, receiver) = receiver(&[400, 200]).await;
    let notifier = Notifier::new(config(dir.path())).unwrap();

    let err = notifier.deliver(&url, &payload()).await.unwrap_err();
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 1);
    let NotifyError::Failed {
        attempts,
        last_error,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*attempts, 1);
    assert_eq!(last_error, "HTTP 400 Bad Request: receiver says no");
    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["attempts"], 1);
    assert_eq!(letters[0]["payload"], payload());
}

#[tokio::test]
async fn closed_port_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let url = closed_port_url();
    let notifier = Notifier::new(config(dir.path())).unwrap();

    let err = notifier.deliver(&url, &payload()).await.unwrap_err();
    let NotifyError::Failed {
        attempts,
        last_error,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*attempts, 3);
    assert!(last_error.contains("Connection refused"), "{last_error}");
    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["url"], url);
    assert_eq!(letters[0]["payload"], payload());
}

#[tokio::test]
async fn non_http_urls_are_refused_without_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let notifier = Notifier::new(config(dir.path())).unwrap();
    for (url, reason) in [
        (
            "ftp://127.0.0.1/hook",
            "has scheme `ftp`; only http and https are supported",
        ),
        (
            "file:///etc/passwd",
            "has scheme `file`; only http and https are supported",
        ),
        (
            "localhost:9000/hook",
            "has scheme `localhost`; only http and https are supported",
        ),
        (
            "127.0.0.1:9000/hook",
            "is not a valid URL (relative URL without a base); expected http://... or https://...",
        ),
    ] {
        let err = notifier.deliver(url, &payload()).await.unwrap_err();
        assert_eq!(err.to_string(), format!("notify_url `{url}` {reason}"));
    }
    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 4, "refused payloads are kept too");
    assert!(
        letters
            .iter()
            .all(|l| l["attempts"] == 0 && l["payload"] == payload())
    );
}

#[tokio::test]
async fn concurrent_failures_append_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let notifier = one_attempt(dir.path());
    let url = closed_port_url();
    let big = "x".repeat(256 * 1024);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let notifier = Arc::clone(&notifier);
            let url = url.clone();
            let payload = json!({"n": i, "filler": big});
            tokio::spawn(async move { notifier.deliver(&url, &payload).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().is_err());
    }
    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 16);
    let mut seen: Vec<u64> = letters
        .iter()
        .map(|l| {
            assert_eq!(l["payload"]["filler"].as_str().unwrap().len(), 256 * 1024);
            l["payload"]["n"].as_u64().unwrap()
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_delivery_abandoned_by_a_shutdown_is_kept_once() {
    // The shutdown keeps the delivery while it waits between attempts; its
    // last attempt then fails too, and does not keep it a second time.
    let dir = tempfile::tempdir().unwrap();
    let notifier = Arc::new(
        Notifier::new(NotifyConfig {
            attempts: 2,
            delay: Duration::from_millis(400),
            ..config(dir.path())
        })
        .unwrap(),
    );
    let url = closed_port_url();
    let task = {
        let notifier = Arc::clone(&notifier);
        let url = url.clone();
        tokio::spawn(async move { notifier.deliver(&url, &payload()).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(notifier.abandon_pending().await, 1);
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(err, NotifyError::Failed { attempts: 2, .. }),
        "{err}"
    );
    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["attempts"], 1);
    assert!(
        letters[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("shutdown")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_stopped_while_its_record_waits_is_kept() {
    // A delivery gives up while another record is being written (the lock
    // is held here), and a shutdown's abort stops it there. It has left the
    // deliveries under way, so the shutdown does not keep it: the write
    // itself must go on.
    let dir = tempfile::tempdir().unwrap();
    let notifier = one_attempt(dir.path());
    let lock = notifier.dead_letters.lock();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _held = lock.lock().unwrap();
        locked.send(()).unwrap();
        released.recv().unwrap();
    });
    is_locked.recv().unwrap();
    let task = {
        let notifier = Arc::clone(&notifier);
        tokio::spawn(async move { notifier.deliver(&closed_port_url(), &payload()).await })
    };
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if notifier.pending.lock().unwrap().is_empty() {
            break;
        }
    }
    assert!(notifier.pending.lock().unwrap().is_empty());
    assert!(!task.is_finished(), "waits for the lock");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(notifier.abandon_pending().await, 0);
    assert!(dead_letters(notifier.config()).is_empty());
    release.send(()).unwrap();
    holder.join().unwrap();
    let mut letters = Vec::new();
    for _ in 0..500 {
        letters = dead_letters(notifier.config());
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["payload"], payload());
    assert_eq!(letters[0]["attempts"], 1);
}

#[tokio::test]
async fn a_password_in_the_url_is_not_written_to_the_dead_letter_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = closed_port_url().replace("http://", "http://user:s3cret@");
    let notifier = one_attempt(dir.path());
    let err = notifier.deliver(&url, &payload()).await.unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let letters = dead_letters(notifier.config());
    assert_eq!(letters.len(), 1);
    let shown = letters[0]["url"].as_str().unwrap();
    assert_eq!(shown, url.replace("s3cret", "***"));
    let text = std::fs::read_to_string(&notifier.config().dead_letter).unwrap();
    assert!(!text.contains("s3cret"), "{text}");
    assert_eq!(
        without_password("http://127.0.0.1:9/x"),
        "http://127.0.0.1:9/x"
    );
}
