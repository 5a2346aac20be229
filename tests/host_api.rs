//! The host's HTTP API from outside: rule validation and persistence
//! (`?notification`), back-pressure (503 with `Retry-After`), the
//! `?image&action=` process API, hostile keys and direct invocation.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::host::{
    Behaviour, QUIET, Receiver, TestHost, decoded, eventually, fixture, test_config,
};
use common::s3::s3_client;
use imgfunc::store::{
    BoxFuture, Kept, ListPage, LocalStore, Object, ObjectMeta, ObjectReader, ObjectStore,
    PutOptions, ReadBody, S3Store, StoreError,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A rule set with one notification whose fields are `fields`.
fn one_rule(fields: Value) -> Value {
    json!({"notifications": [fields]})
}

/// Asserts an error response: its status, its JSON `code`, a request id,
/// and a message that contains every piece of `message_parts`.
async fn assert_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
    message_parts: &[&str],
) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "errors are JSON"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    let message = body["message"].as_str().unwrap().to_string();
    for part in message_parts {
        assert!(message.contains(part), "`{message}` lacks `{part}`");
    }
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_validated_when_set_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let base = json!({
        "id": "thumbs",
        "event_types": ["create_object"],
        "object_filters": ["*.jpg"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_100|format:t_webp"},
    });
    let with = |patch: Value| {
        let mut rule = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            rule[k] = v.clone();
        }
        one_rule(rule)
    };

    let message = assert_error(
        host.set_rules(
            "photos",
            &with(json!({"cloudfunc_args": {"action": "rotate:a_45"}})),
        )
        .await,
        400,
        "invalid_rule",
        &[],
    )
    .await;
    assert_eq!(
        message,
        "notifications[0].cloudfunc_args.action: rotate: a must be one of 0, 90, 180, 270, got 45"
    );
    assert_error(
        host.set_rules("photos", &with(json!({"event_types": ["upload_object"]})))
            .await,
        400,
        "invalid_rule",
        &[
            "notifications[0].event_types[0]",
            "upload_object",
            "create_object, delete_object, abort_multipart, complete_multipart",
        ],
    )
    .await;
    assert_error(
        host.set_rules("photos", &with(json!({"cloudfunc": "tupu-porn"})))
            .await,
        400,
        "invalid_rule",
        &["notifications[0].cloudfunc", "tupu-porn", "image, notifier"],
    )
    .await;
    assert_error(
        host.set_rules(
            "photos",
            &with(json!({"cloudfunc_args": {"key_prefix": "t"}})),
        )
        .await,
        400,
        "invalid_rule",
        &["notifications[0].cloudfunc_args.action", "required"],
    )
    .await;
    let second_bad = json!({"notifications": [base.clone(), {
        "id": "hook", "event_types": "create_object", "cloudfunc": "notifier",
        "notify_url": "ftp://127.0.0.1/hook"}]});
    assert_error(
        host.set_rules("photos", &second_bad).await,
        400,
        "invalid_rule",
        &["notifications[1].notify_url", "ftp"],
    )
    .await;
    assert_eq!(
        host.get_rules("photos").await,
        json!({"notifications": []}),
        "refused rule sets leave nothing behind"
    );

    let good = with(json!({}));
    assert_eq!(host.set_rules("photos", &good).await.status(), 200);
    assert_eq!(host.get_rules("photos").await, good);
    let bad = with(json!({"cloudfunc": "tupu-porn"}));
    assert_eq!(host.set_rules("photos", &bad).await.status(), 400);
    assert_eq!(
        host.get_rules("photos").await,
        good,
        "a refused set keeps the old rules"
    );
    host.stop().await;

    let host = TestHost::local(test_config(dir.path())).await;
    assert_eq!(host.get_rules("photos").await, good, "the rule persisted");
    let put = host
        .put_object("photos", "a.jpg", fixture("images/storm.jpg"), "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);
    let url = host.object_url("photos", "gen_a.jpg");
    let output = eventually("the reloaded rule's output", || async {
        let response = host.http.get(&url).send().await.ok()?;
        if response.status() != 200 {
            return None;
        }
        response.bytes().await.ok()
    })
    .await;
    assert_eq!(decoded(&output), ("webp".to_string(), 100, 67));

    let deleted = host
        .http
        .delete(host.url("/photos?notification"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(host.get_rules("photos").await, json!({"notifications": []}));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_urls_are_judged_when_the_rule_is_set() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.sources.allow_hosts = vec!["cdn.example.com".into()];
    let host = TestHost::local(config).await;
    let rule = |url: &str| {
        let u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url);
        one_rule(json!({
            "id": "marked", "event_types": ["create_object"], "cloudfunc": "image",
            "cloudfunc_args": {"action": format!("resize:w_100|watermark_image:u_{u}"),
                               "save_bucket": "out"}}))
    };
    for (url, why) in [
        (
            "ftp://cdn.example.com/logo.png",
            "scheme ftp is not supported",
        ),
        ("logo.png", "not a URL"),
        (
            "https://example.com/logo.png",
            "host example.com is not on the watermark allow-list",
        ),
        ("s3://marks", "does not name"),
        ("s3://Bad_Bucket/logo.png", "Bad_Bucket"),
    ] {
        assert_error(
            host.set_rules("photos", &rule(url)).await,
            400,
            "invalid_rule",
            &[
                "notifications[0].cloudfunc_args.action",
                "watermark_image",
                url,
                why,
            ],
        )
        .await;
    }
    assert_eq!(host.get_rules("photos").await, json!({"notifications": []}));
    // What this server can read is taken: a store object, an allowed host.
    for url in ["s3://marks/logo.png", "https://CDN.example.com/a/logo.png"] {
        assert_eq!(
            host.set_rules("photos", &rule(url)).await.status(),
            200,
            "{url}"
        );
    }
    host.stop().await;
}

/// Three S3 records for `bucket`, which a queue of one cannot take at once.
/// A host configuration with one image thread and room for one waiting job.
fn one_job_queue(dir: &std::path::Path) -> imgfunc::host::HostConfig {
    let mut config = test_config(dir);
    config.workers = 1;
    config.queue_bound = 1;
    config
}

fn three_records(bucket: &str) -> Value {
    let record = |key: &str| {
        json!({"eventName": "s3:ObjectCreated:Put",
               "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}})
    };
    json!({"Records": [record("a.jpg"), record("b.jpg"), record("c.jpg")]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_larger_than_the_queue_is_refused_whole_with_413() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(one_job_queue(dir.path())).await;
    let rules = one_rule(json!({
        "id": "hook", "event_types": ["create_object"],
        "cloudfunc": "notifier", "notify_url": receiver.url}));
    assert_eq!(host.set_rules("busy", &rules).await.status(), 200);

    // Three invocations never fit a queue of one: no retry would help, so
    // the answer says so instead of asking for one.
    let response = host.post_events(&three_records("busy")).await;
    assert!(response.headers().get("retry-after").is_none());
    assert_error(
        response,
        413,
        "too_many_invocations",
        &["fires 3 invocations", "holds (1, --queue)", "fewer events"],
    )
    .await;
    assert_eq!(host.queue_depth().await, 0, "nothing was queued");
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.hits(), 0, "none of the refused events ran");

    // The queue still works: one record fits.
    let one = json!({"event_type": "create_object", "bucket_name": "busy", "object_key": "d.jpg"});
    let response = host.post_events(&one).await;
    assert_eq!(response.status(), 202);
    let bodies = receiver.wait_for(1).await;
    assert_eq!(bodies[0]["event"]["key"], "d.jpg");
    assert_eq!(bodies[0]["cloudfunc"], "notifier");
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.bodies().len(), 1);

    // So is a PUT that two rules would act on, and the object is not kept.
    let twice = json!({"notifications": [
        {"id": "one", "event_types": ["create_object"], "cloudfunc": "notifier", "notify_url": receiver.url},
        {"id": "two", "event_types": ["create_object"], "cloudfunc": "notifier", "notify_url": receiver.url}]});
    assert_eq!(host.set_rules("twice", &twice).await.status(), 200);
    let put = host
        .put_object("twice", "a.jpg", b"bytes".to_vec(), "image/jpeg")
        .await;
    assert_error(put, 413, "too_many_invocations", &["fires 2 invocations"]).await;
    assert!(host.list_keys("twice").await.is_empty());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_their_endpoints_limit_are_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_object_bytes = 4 << 20;
    let host = TestHost::local(config).await;
    // JSON is parsed into a tree several times its size: 3 MiB of zeros is
    // refused on every JSON endpoint before it is parsed.
    let zeros = format!("[{}0]", "0,".repeat(3 << 19));
    for (method, path) in [
        ("POST", "/v1/events"),
        ("POST", "/v1/invoke"),
        ("PUT", "/photos?notification"),
    ] {
        let request = match method {
            "POST" => host.http.post(host.url(path)),
            _ => host.http.put(host.url(path)),
        };
        let response = request
            .header("content-type", "application/json")
            .body(zeros.clone())
            .send()
            .await
            .unwrap();
        assert_error(
            response,
            413,
            "body_too_large",
            &["events, invocations and rules", "2097152 bytes"],
        )
        .await;
    }
    // Objects have their own, larger limit: 3 MiB is stored, 5 MiB is not.
    let three = vec![7u8; 3 << 20];
    let stored = host
        .put_object(
            "photos",
            "three.bin",
            three.clone(),
            "application/octet-stream",
        )
        .await;
    assert_eq!(stored.status(), 201);
    let response = host
        .put_object(
            "photos",
            "five.bin",
            vec![7u8; 5 << 20],
            "application/octet-stream",
        )
        .await;
    assert_error(
        response,
        413,
        "body_too_large",
        &["objects may have 4194304 bytes"],
    )
    .await;
    assert_eq!(host.list_keys("photos").await, ["three.bin"]);
    let back = host
        .http
        .get(host.object_url("photos", "three.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(back.bytes().await.unwrap(), three);
    // A small event still goes through.
    let one =
        json!({"event_type": "create_object", "bucket_name": "photos", "object_key": "three.bin"});
    assert_eq!(host.post_events(&one).await.status(), 202);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_requests_refuse_objects_over_the_input_limit() {
    let dir = tempfile::tempdir().unwrap();
    let storm = fixture("images/storm.jpg");
    let mut config = test_config(dir.path());
    config.limits.max_input_bytes = storm.len() - 1;
    let host = TestHost::local(config).await;
    let small = fixture("images/adwaita.webp");
    assert!(small.len() < storm.len() - 1);
    for (key, bytes) in [("storm.jpg", &storm), ("adwaita.webp", &small)] {
        let put = host
            .put_object("photos", key, bytes.clone(), "image/jpeg")
            .await;
        assert_eq!(put.status(), 201);
    }
    let get = |key: &str| {
        let url = format!(
            "{}?image&action=resize:w_40",
            host.object_url("photos", key)
        );
        host.http.get(url).send()
    };
    let limit = (storm.len() - 1).to_string();
    let size = storm.len().to_string();
    assert_error(
        get("storm.jpg").await.unwrap(),
        413,
        "input_too_large",
        &[&size, &limit],
    )
    .await;
    let resized = get("adwaita.webp").await.unwrap();
    assert_eq!(resized.status(), 200);
    let (_, width, _) = decoded(&resized.bytes().await.unwrap());
    assert_eq!(width, 40);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_events_wait_for_room_in_a_full_queue() {
    // Uploads to `in` are resized into `out`, and every object in `out` is
    // reported twice, by two rules. The queue holds one job, so an output's
    // two jobs never fit at once: its event must wait for room, not be
    // dropped, since the output is already stored. Eight clients keep the
    // queue busy meanwhile.
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(one_job_queue(dir.path())).await;
    let resize = one_rule(json!({
        "id": "small", "event_types": ["create_object"], "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_32", "save_bucket": "out"}}));
    assert_eq!(host.set_rules("in", &resize).await.status(), 200);
    let report = |id: &str| {
        json!({"id": id, "event_types": ["create_object"],
               "cloudfunc": "notifier", "notify_url": receiver.url})
    };
    let report = json!({"notifications": [report("one"), report("two")]});
    assert_eq!(host.set_rules("out", &report).await.status(), 200);

    // Eight clients upload four photos each, retrying on 503.
    let uploads = 32;
    let storm = fixture("images/storm.jpg");
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..8 {
        let (http, storm) = (host.http.clone(), storm.clone());
        let urls: Vec<String> = (0..4)
            .map(|i| host.object_url("in", &format!("{:02}.jpg", client * 4 + i)))
            .collect();
        clients.spawn(async move {
            for url in urls {
                loop {
                    let put = http.put(&url).body(storm.clone()).send().await.unwrap();
                    match put.status().as_u16() {
                        201 => break,
                        503 => continue,
                        other => panic!("PUT answered {other}"),
                    }
                }
            }
        });
    }
    clients.join_all().await;
    receiver.wait_for(2 * uploads).await;
    tokio::time::sleep(QUIET).await;
    let mut reported: Vec<String> = receiver
        .bodies()
        .iter()
        .map(|b| {
            format!(
                "{} {}",
                b["rule_id"].as_str().unwrap(),
                b["event"]["key"].as_str().unwrap()
            )
        })
        .collect();
    reported.sort();
    let mut expected: Vec<String> = (0..uploads)
        .flat_map(|i| ["one", "two"].map(|rule| format!("{rule} gen_{i:02}.jpg")))
        .collect();
    expected.sort();
    assert_eq!(reported, expected);
    // An output's event carries its size, as an upload's does.
    for body in receiver.bodies() {
        let key = body["event"]["key"].as_str().unwrap();
        let stored = host
            .http
            .get(host.object_url("out", key))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body["event"]["size"], json!(stored.len()), "{body}");
    }
    host.stop().await;
}

/// An S3 endpoint that accepts connections and never answers, so that a
/// worker reading from it stays busy; counts the connections.
async fn silent_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (format!("http://{addr}"), accepted)
}

/// Rules are held to the store's bucket names when they are set: on S3,
/// a `save_bucket` or `save:` target S3 refuses is a 400 naming the field,
/// not an error at every event. The local store takes those names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_held_to_the_stores_bucket_names() {
    let (endpoint, accepted) = silent_endpoint().await;
    let store = S3Store::new(s3_client(&endpoint, "ak", "sk"), endpoint.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.embedded = false;
    let host = TestHost::start(config, Arc::new(store)).await;
    let rule = |args: Value| {
        one_rule(json!({
            "id": "thumbs", "event_types": ["create_object"],
            "cloudfunc": "image", "cloudfunc_args": args}))
    };
    let to_my_thumbs = rule(json!({"action": "resize:w_10", "save_bucket": "my_thumbs"}));
    let message = assert_error(
        host.set_rules("photos", &to_my_thumbs).await,
        400,
        "invalid_rule",
        &[
            "notifications[0].cloudfunc_args.save_bucket",
            "my_thumbs",
            "'_'",
        ],
    )
    .await;
    assert!(
        message.starts_with("notifications[0].cloudfunc_args.save_bucket"),
        "{message}"
    );
    let save_to_ab = rule(json!({"action": "resize:w_10|save:b_ab,k_x.jpg"}));
    assert_error(
        host.set_rules("photos", &save_to_ab).await,
        400,
        "invalid_rule",
        &[
            "notifications[0].cloudfunc_args.action",
            "save:",
            "at least 3 characters",
        ],
    )
    .await;
    let fine = rule(json!({"action": "resize:w_10", "save_bucket": "my-thumbs"}));
    assert_eq!(host.set_rules("photos", &fine).await.status(), 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no request reached S3");
    host.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    assert_eq!(host.set_rules("photos", &to_my_thumbs).await.status(), 200);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_and_a_full_queue_answer_503() {
    let (endpoint, accepted) = silent_endpoint().await;
    let store = S3Store::new(s3_client(&endpoint, "ak", "sk"), endpoint.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.embedded = false;
    config.workers = 1;
    config.queue_bound = 1;
    config.drain_timeout = Duration::from_millis(300);
    let host = TestHost::start(config, Arc::new(store)).await;
    let rules = one_rule(json!({
        "id": "thumbs", "event_types": ["create_object"],
        "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_10"}}));
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let event = |key: &str| json!({"event_type": "create_object", "bucket_name": "photos", "object_key": key});

    // One worker has four slots for invocations reading their sources
    // (the reads overlap the image work): a.jpg to d.jpg take them and are
    // stuck, e.jpg waits in the queue. The queue holds one, so each is posted once the one before it
    // was taken (a worker may not have taken it yet on a busy machine).
    for (n, name) in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"].into_iter().enumerate() {
        assert_eq!(host.post_events(&event(name)).await.status(), 202);
        eventually(&format!("{name} to be taken and stuck reading"), || {
            std::future::ready((accepted.load(Ordering::SeqCst) > n).then_some(()))
        })
        .await;
    }
    assert_eq!(host.post_events(&event("e.jpg")).await.status(), 202);
    assert_eq!(host.queue_depth().await, 1);
    let refused = host.post_events(&event("f.jpg")).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_error(refused, 503, "queue_full", &["1 waiting"]).await;
    assert_eq!(host.queue_depth().await, 1, "f.jpg was not queued");
    let ready: Value = host
        .http
        .get(host.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["queue_bound"], 1);
    assert_eq!(ready["workers"], 1);
    // The stuck work is given up after the drain timeout.
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_process_api() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let original = fixture("images/storm.jpg");
    assert_eq!(
        host.put_object("photos", "storm.jpg", original.clone(), "image/jpeg")
            .await
            .status(),
        201
    );
    let get = |query: &str| {
        let url = format!("{}?{query}", host.object_url("photos", "storm.jpg"));
        host.http.get(url).send()
    };

    let plain = get("").await.unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers()["content-type"], "image/jpeg");
    assert_eq!(plain.bytes().await.unwrap(), original);

    let resized = get("image&action=resize:w_100|format:t_png").await.unwrap();
    assert_eq!(resized.status(), 200);
    assert_eq!(resized.headers()["content-type"], "image/png");
    let (format, width, height) = decoded(&resized.bytes().await.unwrap());
    assert_eq!((format.as_str(), width), ("png", 100));
    assert!((66..=67).contains(&height), "height {height}");

    let info = get("image&action=info").await.unwrap();
    assert_eq!(info.status(), 200);
    assert_eq!(info.headers()["content-type"], "application/json");
    let info: Value = info.json().await.unwrap();
    assert_eq!(info["width"], 480);
    assert_eq!(info["height"], 320);
    assert_eq!(info["type"], "jpeg");
    assert_eq!(info["make"], "Canon");

    assert_error(
        get("image&action=rotate:a_45").await.unwrap(),
        400,
        "invalid_action",
        &["rotate", "45"],
    )
    .await;
    assert_error(
        get("image").await.unwrap(),
        400,
        "invalid_action",
        &["action"],
    )
    .await;
    assert_error(
        get("image&action=resize:w_10&action=rotate:a_90")
            .await
            .unwrap(),
        400,
        "invalid_action",
        &["action", "more than once"],
    )
    .await;
    // A base64 text that ends in `+` (水印文字>>>, unpadded as QingStor
    // writes it) keeps its `+`: the same picture as the URL-safe `-`, not
    // that of 水印文字>> (the `+` lost as a form-decoded space).
    let mut marked = Vec::new();
    for text in [
        "5rC05Y2w5paH5a2XPj4+",
        "5rC05Y2w5paH5a2XPj4-",
        "5rC05Y2w5paH5a2XPj4",
    ] {
        let response = get(&format!("image&action=watermark:t_{text},p_1|format:t_png"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{text}");
        marked.push(response.bytes().await.unwrap());
    }
    assert_eq!(marked[0], marked[1]);
    assert_ne!(marked[0], marked[2]);
    assert_error(
        get("image&action=resize:w_10|save:b_photos,k_x.jpg")
            .await
            .unwrap(),
        400,
        "invalid_action",
        &["save"],
    )
    .await;

    let missing = format!(
        "{}?image&action=info",
        host.object_url("photos", "missing.jpg")
    );
    assert_error(
        host.http.get(missing).send().await.unwrap(),
        404,
        "not_found",
        &["missing.jpg"],
    )
    .await;

    let text = b"not pixels at all".to_vec();
    assert_eq!(
        host.put_object("photos", "notes.jpg", text, "image/jpeg")
            .await
            .status(),
        201
    );
    let notes = format!(
        "{}?image&action=resize:w_10",
        host.object_url("photos", "notes.jpg")
    );
    assert_error(
        host.http.get(notes).send().await.unwrap(),
        422,
        "not_an_image",
        &["not an image"],
    )
    .await;

    let health = host.http.get(host.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_never_reach_outside_the_data_dir() {
    let outer = tempfile::tempdir().unwrap();
    let data_dir = outer.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let host = TestHost::local(test_config(&data_dir)).await;
    let receiver = Receiver::start(Behaviour::Accept).await;
    let rules = one_rule(json!({
        "id": "thumbs", "event_types": ["create_object"], "notify_url": receiver.url,
        "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_10"}}));
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);

    // Percent-encoded slashes survive URL parsing and reach the key as
    // `../../etc/passwd`.
    for path in [
        "/photos/..%2F..%2Fetc%2Fpasswd",
        "/photos/a/..%2F..%2F..%2Fetc%2Fpasswd",
        "/photos/..%2F..%2Fetc%2Fpasswd?image&action=info",
    ] {
        let url = host.url(path);
        // A write with a query is refused for the query first (501, as
        // `s3_operations_the_api_lacks_are_refused_and_change_nothing`
        // shows): its key is tried without it.
        let write_url = host.url(path.split('?').next().unwrap_or(path));
        let put = host
            .http
            .put(&write_url)
            .body(fixture("images/storm.jpg"))
            .send()
            .await
            .unwrap();
        assert_error(put, 400, "invalid_key", &[".."]).await;
        assert_error(
            host.http.get(&url).send().await.unwrap(),
            400,
            "invalid_key",
            &[".."],
        )
        .await;
        assert_error(
            host.http.delete(&write_url).send().await.unwrap(),
            400,
            "invalid_key",
            &[".."],
        )
        .await;
    }
    let bucket_escape = host.url("/..%2Fetc/passwd");
    assert_error(
        host.http.get(&bucket_escape).send().await.unwrap(),
        400,
        "invalid_bucket",
        &[],
    )
    .await;
    assert_error(
        host.http
            .put(host.url("/..%2Frules?notification"))
            .json(&rules)
            .send()
            .await
            .unwrap(),
        400,
        "invalid_bucket",
        &[],
    )
    .await;
    // An event may name such a key (it is a valid S3 key); the invocation
    // then fails in the local store, reading and writing nothing.
    let hostile_event = json!({"Records": [{"eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": "photos"}, "object": {"key": "..%2F..%2Fetc%2Fpasswd"}}}]});
    assert_eq!(host.post_events(&hostile_event).await.status(), 202);
    let payload = receiver.wait_for(1).await.remove(0);
    assert_eq!(payload["event"]["key"], "../../etc/passwd");
    assert_eq!(payload["status"], "error");
    assert_eq!(payload["error"]["code"], "invalid_key", "{payload}");
    assert_eq!(payload["outputs"], json!([]));
    host.stop().await;

    let mut outside: Vec<String> = std::fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(outside, ["data"], "nothing written next to the data dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_answers_with_the_result_synchronously() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    assert_eq!(
        host.put_object(
            "photos",
            "in/storm.jpg",
            fixture("images/storm.jpg"),
            "image/jpeg"
        )
        .await
        .status(),
        201
    );
    let invoke = |body: Value| host.http.post(host.url("/v1/invoke")).json(&body).send();
    let event = json!({"event_type": "create_object", "bucket_name": "photos",
                       "object_key": "in/storm.jpg"});

    let response = invoke(json!({"event": event, "rule": {
        "id": "direct", "event_types": "create_object", "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_50|format:t_webp", "key_prefix": "direct"}}}))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["rule_id"], "direct");
    assert_eq!(
        result["event"],
        json!({"bucket": "photos", "key": "in/storm.jpg", "type": "create_object"})
    );
    let output = &result["outputs"][0];
    assert_eq!(output["key"], "direct_in/storm.jpg");
    assert_eq!(output["content_type"], "image/webp");
    assert_eq!(
        (output["width"].clone(), output["height"].clone()),
        (json!(50), json!(33))
    );
    // Written before the answer: readable at once, no polling.
    let written = host
        .http
        .get(host.object_url("photos", "direct_in/storm.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    assert_eq!(written.headers()["content-type"], "image/webp");
    let bytes = written.bytes().await.unwrap();
    assert_eq!(output["bytes"], bytes.len());
    assert_eq!(decoded(&bytes), ("webp".to_string(), 50, 33));

    // An S3 record works as the event too; `info` comes back in the result.
    let s3_event = json!({"Records": [{"eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "photos"}, "object": {"key": "in%2Fstorm.jpg"}}}]});
    let result: Value = invoke(json!({"event": s3_event, "rule": {
        "id": "info", "event_types": ["create_object"], "cloudfunc": "image",
        "cloudfunc_args": {"action": "info"}}}))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["outputs"], json!([]));
    assert_eq!(result["info"]["width"], 480);

    let result: Value = invoke(json!({"event": {"event_type": "create_object",
        "bucket_name": "photos", "object_key": "in/none.jpg"}, "rule": {
        "id": "direct", "event_types": "create_object", "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_50"}}}))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(result["status"], "error");
    assert_eq!(result["error"]["code"], "not_found");
    assert_eq!(result["outputs"], json!([]));

    // A `save` that fails after the rule's own output was written: the
    // result is an error and still lists the object that is in the store.
    let taken = host
        .put_object("photos", "taken/x.txt", b"x".to_vec(), "text/plain")
        .await;
    assert_eq!(taken.status(), 201);
    let result: Value = invoke(json!({"event": event, "rule": {
        "id": "partial", "event_types": "create_object", "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_40|save:b_photos,k_taken"}}}))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(result["status"], "error", "{result}");
    assert_eq!(result["error"]["code"], "invalid_key", "{result}");
    assert_eq!(result["outputs"].as_array().unwrap().len(), 1, "{result}");
    assert_eq!(result["outputs"][0]["key"], "gen_in/storm.jpg");
    let written = host
        .http
        .get(host.object_url("photos", "gen_in/storm.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(decoded(&written.bytes().await.unwrap()).1, 40);

    assert_error(
        invoke(
            json!({"event": event, "rule": {"id": "x", "event_types": "create_object",
            "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_0"}}}),
        )
        .await
        .unwrap(),
        400,
        "invalid_rule",
        &["cloudfunc_args.action", "resize"],
    )
    .await;
    assert_error(
        invoke(json!({"rule": {}})).await.unwrap(),
        400,
        "invalid_request",
        &["event"],
    )
    .await;
    // An image rule on a bucket the store refuses, as setting it would be;
    // a notifier rule takes any bucket an event names.
    let image_rule = json!({"event": {"event_type": "create_object",
        "bucket_name": "BAD", "object_key": "a.jpg"}, "rule": {"id": "x",
        "event_types": "create_object", "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_10"}}});
    assert_error(
        invoke(image_rule).await.unwrap(),
        400,
        "invalid_rule",
        &["rule.bucket", "BAD"],
    )
    .await;
    let saving_elsewhere = json!({"event": event, "rule": {"id": "x",
        "event_types": "create_object", "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_10", "save_bucket": "_thumbs"}}});
    assert_error(
        invoke(saving_elsewhere).await.unwrap(),
        400,
        "invalid_rule",
        &["rule.cloudfunc_args.save_bucket"],
    )
    .await;
    let notified = invoke(json!({"event": {"event_type": "create_object",
        "bucket_name": "BAD", "object_key": "a.jpg"}, "rule": {"id": "x",
        "event_types": "create_object", "cloudfunc": "notifier",
        "notify_url": "http://127.0.0.1:9/hook"}}))
    .await
    .unwrap();
    assert_eq!(notified.status(), 200, "{:?}", notified.text().await);
    host.stop().await;
}

/// The embedded store with its writes to one bucket held at a gate, as a
/// disk that stalls on writes would hold them; counts the writes waiting.
/// Reads may be held too, at `reads`, and writes to `panics` panic, as a
/// store's client with a bug would.
struct StalledWrites {
    inner: LocalStore,
    bucket: &'static str,
    gate: tokio::sync::Semaphore,
    waiting: AtomicUsize,
    reads: Arc<ReadGate>,
    panics: &'static str,
}

impl StalledWrites {
    /// The local store at `dir`, its writes to `bucket` held, reads free
    /// and nothing panicking.
    fn over(dir: &std::path::Path, bucket: &'static str) -> StalledWrites {
        StalledWrites {
            inner: LocalStore::new(dir.to_path_buf()),
            bucket,
            gate: tokio::sync::Semaphore::new(0),
            waiting: AtomicUsize::new(0),
            reads: Arc::default(),
            panics: "",
        }
    }
}

/// Holds reads where they run on the blocking pool (which a caller that
/// goes away cannot stop) until it opens; counts the reads under way and
/// the most at once.
#[derive(Default)]
struct ReadGate {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    under_way: AtomicUsize,
    most: AtomicUsize,
}

impl ReadGate {
    fn closed() -> Arc<ReadGate> {
        let gate = ReadGate::default();
        *gate.closed.lock().unwrap() = true;
        Arc::new(gate)
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    /// `read`, waiting at the gate first.
    fn hold(self: &Arc<Self>, read: ReadBody) -> ReadBody {
        let gate = self.clone();
        Box::new(move |meta, body| {
            let now = gate.under_way.fetch_add(1, Ordering::SeqCst) + 1;
            gate.most.fetch_max(now, Ordering::SeqCst);
            let mut closed = gate.closed.lock().unwrap();
            while *closed {
                closed = gate.opened.wait(closed).unwrap();
            }
            drop(closed);
            let read = read(meta, body);
            gate.under_way.fetch_sub(1, Ordering::SeqCst);
            read
        })
    }
}

impl ObjectStore for StalledWrites {
    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Object, StoreError>> {
        self.inner.get(bucket, key)
    }
    fn open(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectReader, StoreError>> {
        self.inner.open(bucket, key)
    }
    fn open_with(
        &self,
        bucket: &str,
        key: &str,
        read: ReadBody,
    ) -> BoxFuture<'_, Result<(ObjectMeta, Option<Kept>), StoreError>> {
        self.inner.open_with(bucket, key, self.reads.hold(read))
    }
    fn head(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectMeta, StoreError>> {
        self.inner.head(bucket, key)
    }
    fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Bytes,
        opts: PutOptions,
    ) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        let held = bucket == self.bucket;
        assert!(bucket != self.panics, "a write to {bucket}");
        let put = self.inner.put(bucket, key, bytes, opts);
        Box::pin(async move {
            if held {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                let _pass = self.gate.acquire().await;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            put.await
        })
    }
    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.delete(bucket, key)
    }
    fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: &str,
    ) -> BoxFuture<'_, Result<ListPage, StoreError>> {
        self.inner.list_page(bucket, prefix, start_after)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_output_writes_do_not_hold_back_image_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.embedded = false;
    config.workers = 1;
    let store = Arc::new(StalledWrites::over(dir.path(), "thumbs"));
    std::fs::create_dir(dir.path().join("thumbs")).unwrap();
    let photo = fixture("images/storm.jpg");
    const PHOTOS: usize = 12;
    for n in 0..PHOTOS {
        store
            .inner
            .put(
                "photos",
                &format!("{n}.jpg"),
                Bytes::from(photo.clone()),
                PutOptions::with_content_type("image/jpeg"),
            )
            .await
            .unwrap();
    }
    let host = TestHost::start(config, store.clone()).await;
    let rules = one_rule(json!({
        "id": "thumbs", "event_types": ["create_object"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_40", "save_bucket": "thumbs"}}));
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let records: Vec<Value> = (0..PHOTOS)
        .map(|n| {
            json!({"eventName": "s3:ObjectCreated:Put",
                   "s3": {"bucket": {"name": "photos"}, "object": {"key": format!("{n}.jpg")}}})
        })
        .collect();
    let posted = host.post_events(&json!({ "Records": records })).await;
    assert_eq!(posted.status(), 202);

    // One image thread has four slots for sources, yet every photo is read
    // and processed while no output can be written: waiting writes hold
    // no slot.
    eventually("every output to wait at the stalled disk", || {
        std::future::ready((store.waiting.load(Ordering::SeqCst) == PHOTOS).then_some(()))
    })
    .await;
    assert_eq!(host.queue_depth().await, 0);
    assert!(store.inner.list("thumbs", "").await.unwrap().is_empty());

    store.gate.add_permits(PHOTOS);
    let written = eventually("the outputs once the disk moves", || {
        let store = store.clone();
        async move {
            let keys = store.inner.list("thumbs", "").await.ok()?;
            (keys.len() == PHOTOS).then_some(keys)
        }
    })
    .await;
    let first = store.inner.get("thumbs", &written[0].key).await.unwrap();
    let (format, width, _) = decoded(&first.bytes);
    assert_eq!((format.as_str(), width), ("jpeg", 40));
    host.stop().await;
}

/// An invocation that panics (here in a store's client) ends alone, with
/// an `internal` result delivered like any other: the worker that ran it
/// goes on with the next job, and the job counts as finished, so the host
/// still drains and stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_that_panics_leaves_its_worker_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.workers = 1;
    let store = Arc::new(StalledWrites {
        panics: "boom",
        ..StalledWrites::over(dir.path(), "none")
    });
    for bucket in ["boom", "thumbs"] {
        std::fs::create_dir(dir.path().join(bucket)).unwrap();
    }
    let host = TestHost::start(config, store.clone()).await;
    let receiver = Receiver::start(Behaviour::Accept).await;
    let rules = json!({"notifications": [
        {"id": "boom", "event_types": ["create_object"], "object_filters": ["boom/*"],
         "cloudfunc": "image", "notify_url": receiver.url,
         "cloudfunc_args": {"action": "resize:w_40", "save_bucket": "boom"}},
        {"id": "thumbs", "event_types": ["create_object"], "object_filters": ["ok/*"],
         "cloudfunc": "image",
         "cloudfunc_args": {"action": "resize:w_40", "save_bucket": "thumbs"}}]});
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    // More panics than the one image thread has workers (four), then a
    // photo for the other rule.
    let photo = fixture("images/storm.jpg");
    host.put_jpegs("photos", (0..6).map(|n| format!("boom/{n}.jpg")), &photo)
        .await;
    let put = host
        .put_object("photos", "ok/a.jpg", photo, "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);
    let written = eventually("the other rule's output", || {
        let store = store.clone();
        async move {
            let keys = store.inner.list("thumbs", "").await.ok()?;
            (!keys.is_empty()).then_some(keys)
        }
    })
    .await;
    assert_eq!(written[0].key, "gen_ok/a.jpg");
    let results = receiver.wait_for(6).await;
    for result in &results {
        assert_eq!(result["status"], "error", "{result}");
        assert_eq!(result["error"]["code"], "internal", "{result}");
        let message = result["error"]["message"].as_str().unwrap();
        assert!(message.contains("a write to boom"), "{message}");
    }
    assert_eq!(host.queue_depth().await, 0);
    // Well inside the drain timeout (15 s): nothing is left counted.
    let started = std::time::Instant::now();
    host.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A `?image` request keeps its image slot until its source is read and
/// its image work done, even if its client hangs up meanwhile: otherwise
/// clients that give up could start any number of reads, each holding a
/// source in memory, past the bound the slots set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_requests_whose_clients_hang_up_keep_their_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.workers = 1;
    let store = Arc::new(StalledWrites {
        reads: ReadGate::closed(),
        ..StalledWrites::over(dir.path(), "none")
    });
    let host = TestHost::start(config, store.clone()).await;
    let put = host
        .put_object("photos", "a.jpg", fixture("images/storm.jpg"), "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);
    let url = format!("{}?image&action=info", host.object_url("photos", "a.jpg"));
    // Time enough for three of them to reach the held read on a busy
    // machine before they give up.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1000))
        .build()
        .unwrap();
    // A failed assertion opens the gate, or the test would wait for ever
    // for the held reads as it ends.
    struct OpenOnDrop(Arc<ReadGate>);
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let _open = OpenOnDrop(store.reads.clone());
    // One image thread: four slots, one of them held by the idle queue
    // worker that waits for a job. Two waves of eight clients that give up
    // after a second, the second once the first has gone.
    for _ in 0..2 {
        let requests: Vec<_> = (0..8)
            .map(|_| tokio::spawn(impatient.get(&url).send()))
            .collect();
        for request in requests {
            assert!(request.await.unwrap().is_err(), "the client gives up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.reads.under_way.load(Ordering::SeqCst), 3);
    }
    assert_eq!(store.reads.most.load(Ordering::SeqCst), 3);
    // Once the reads go through, the slots come back.
    store.reads.open();
    let info = host.http.get(&url).send().await.unwrap();
    assert_eq!(info.status(), 200);
    let info: Value = info.json().await.unwrap();
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(480), Some(320))
    );
    assert_eq!(store.reads.most.load(Ordering::SeqCst), 3);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_a_put_cannot_keep_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let put = |headers: Vec<(&'static str, reqwest::header::HeaderValue)>| {
        let mut request = host
            .http
            .put(host.object_url("meta", "a.txt"))
            .body("hello");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let raw = |bytes: &[u8]| reqwest::header::HeaderValue::from_bytes(bytes).unwrap();
    // A value that is not ASCII (UTF-8 for 水印), in metadata or the type.
    let response = put(vec![("x-amz-meta-note", raw("水印".as_bytes()))])
        .await
        .unwrap();
    assert_error(
        response,
        400,
        "invalid_metadata",
        &["x-amz-meta-note", "printable ASCII"],
    )
    .await;
    let response = put(vec![("content-type", raw("image/水".as_bytes()))])
        .await
        .unwrap();
    assert_error(response, 400, "invalid_metadata", &["content-type"]).await;
    // The same field twice.
    let response = put(vec![
        ("x-amz-meta-owner", raw(b"alice")),
        ("x-amz-meta-owner", raw(b"bob")),
    ])
    .await
    .unwrap();
    assert_error(
        response,
        400,
        "invalid_metadata",
        &["x-amz-meta-owner", "twice"],
    )
    .await;
    // Nothing was stored by the refused PUTs.
    let get = host
        .http
        .get(host.object_url("meta", "a.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 404);
    // A clean PUT keeps its fields.
    let response = put(vec![("x-amz-meta-owner", raw(b"alice"))])
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let head = host
        .http
        .head(host.object_url("meta", "a.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.headers()["x-amz-meta-owner"], "alice");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_no_route_takes_answer_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let response = host
        .http
        .put(host.url("/photos/"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_key", &["must not be empty"]).await;
    let response = host.http.get(host.url("/")).send().await.unwrap();
    assert_error(response, 404, "no_route", &["/{bucket}/{key}"]).await;
    // A bucket name of 33 two-byte characters is refused for its characters.
    let bucket = "é".repeat(33);
    let response = host
        .http
        .get(host.url(&format!("/{bucket}")))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_bucket", &["'é' is not allowed"]).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifier_rules_on_any_bucket_an_event_may_name_are_read_and_removed() {
    // `My_Bucket` is no bucket of the store, but an event (and a rule file)
    // may name it: its notifier rules are set, read and removed by that
    // name; an image rule there is refused, as the store cannot hold it.
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let notifier = json!({"notifications": [{"id": "n", "event_types": "create_object",
        "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:9/hook"}]});
    assert_eq!(host.set_rules("My_Bucket", &notifier).await.status(), 200);
    assert_eq!(
        host.get_rules("My_Bucket").await["notifications"][0]["id"],
        "n"
    );
    let deleted = host
        .http
        .delete(host.url("/My_Bucket?notification"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        host.get_rules("My_Bucket").await,
        json!({"notifications": []})
    );
    let image = json!({"notifications": [{"id": "i", "event_types": "create_object",
        "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_10"}}]});
    assert_error(
        host.set_rules("My_Bucket", &image).await,
        400,
        "invalid_rule",
        &["bucket", "My_Bucket"],
    )
    .await;
    // A store's name the rule book does not take still answers the empty list.
    assert_eq!(host.get_rules("_x").await, json!({"notifications": []}));
    // Objects stay under the store's names.
    assert_error(
        host.http.get(host.url("/My_Bucket")).send().await.unwrap(),
        400,
        "invalid_bucket",
        &[],
    )
    .await;
    host.stop().await;
}

/// A local store whose writes to `uploads` wait at a gate.
fn stalled_uploads(dir: &std::path::Path) -> Arc<StalledWrites> {
    Arc::new(StalledWrites::over(dir, "uploads"))
}

/// PUTs `uploads/a.jpg` and gives up after 300 ms, while the write waits
/// at the stalled disk; returns once the write is waiting there.
async fn put_and_give_up(host: &TestHost, store: &StalledWrites) {
    let gave_up = host
        .http
        .put(host.object_url("uploads", "a.jpg"))
        .header("content-type", "image/jpeg")
        .timeout(std::time::Duration::from_millis(300))
        .body(fixture("images/storm.jpg"))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    eventually("the write to wait at the stalled disk", || {
        std::future::ready((store.waiting.load(Ordering::SeqCst) == 1).then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_the_client_gives_up_on_is_stored_and_fires_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = stalled_uploads(dir.path());
    let host = TestHost::start(test_config(dir.path()), store.clone()).await;
    let rules = one_rule(json!({
        "id": "thumbs", "event_types": ["create_object"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_40", "save_bucket": "thumbs"}}));
    assert_eq!(host.set_rules("uploads", &rules).await.status(), 200);
    put_and_give_up(&host, &store).await;
    store.gate.add_permits(1);
    // The object is stored and its event ran the rule.
    let written = eventually("the rule's output", || {
        let store = store.clone();
        async move {
            let keys = store.inner.list("thumbs", "").await.ok()?;
            (keys.len() == 1).then_some(keys)
        }
    })
    .await;
    assert_eq!(written[0].key, "gen_a.jpg");
    assert!(store.inner.head("uploads", "a.jpg").await.is_ok());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_a_put_whose_client_gave_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = stalled_uploads(dir.path());
    // No rule matches, so the write reserves no room in the queue: only the
    // shutdown's wait for requests' own work keeps it.
    let host = TestHost::start(test_config(dir.path()), store.clone()).await;
    put_and_give_up(&host, &store).await;
    // The disk moves on only after the shutdown has begun; the shutdown
    // waits for the write.
    let release = tokio::spawn({
        let store = store.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            store.gate.add_permits(1);
        }
    });
    host.stop().await;
    // Stored before the stop returned, though the disk moved on only
    // 1.5 s after the stop began.
    assert!(store.inner.head("uploads", "a.jpg").await.is_ok());
    release.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_streams_objects_of_many_chunks_whole() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    // 3 MiB and a bit, in chunks of 256 KiB: every byte, in order.
    let bytes: Vec<u8> = (0..(3 << 20) + 12345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let put = host
        .put_object("big", "blob.bin", bytes.clone(), "application/x-test")
        .await;
    assert_eq!(put.status(), 201);
    let get = host
        .http
        .get(host.object_url("big", "blob.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.headers()["content-type"], "application/x-test");
    assert_eq!(
        get.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
    assert!(get.bytes().await.unwrap() == bytes);
    // An empty object is an empty body.
    assert_eq!(
        host.put_object("big", "empty", Vec::new(), "text/plain")
            .await
            .status(),
        201
    );
    let get = host
        .http
        .get(host.object_url("big", "empty"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert!(get.bytes().await.unwrap().is_empty());
    host.stop().await;
}

/// Reads what the server sends on `stream` until it closes the connection
/// or `wait` passes; `None` if it is still open then.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.client_timeout = Duration::from_secs(1);
    config.max_connections = 3;
    let host = TestHost::local(config).await;

    // A client that sends nothing at all is closed after the timeout too.
    let mut silent = TcpStream::connect(host.addr).await.unwrap();
    let closed = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(
        closed.is_some(),
        "a silent client still held its connection"
    );

    // Headers never finished: closed after the timeout, without an answer
    // to a request that never came.
    let mut half = TcpStream::connect(host.addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let closed = read_until_closed(&mut half, Duration::from_secs(10)).await;
    assert!(
        closed.is_some(),
        "a half-sent request still held its connection"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A PUT of `length` bytes to /slow/`key` whose body starts with `first`.
    let start_put = |key: &'static str, length: usize, first: &'static [u8]| async move {
        let mut stream = TcpStream::connect(host.addr).await.unwrap();
        let head = format!(
            "PUT /slow/{key} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {length}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(first).await.unwrap();
        stream
    };

    // A body that stops coming: 408 naming the wait.
    let mut trickle = start_put("a.bin", 100, b"0123456789").await;
    let answer = read_until_closed(&mut trickle, Duration::from_secs(10))
        .await
        .expect("the connection ends");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(host.list_keys("slow").await.is_empty(), "nothing stored");

    // A body that trickles in, a byte well within the timeout each time:
    // once the timeout has passed it must come at 16 KiB a second.
    let mut trickle = start_put("b.bin", 100_000, b"0").await;
    let started = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if trickle.write_all(b"1").await.is_err() {
                break;
            }
        }
        trickle
    });
    let mut trickle = sender.await.unwrap();
    let answer = read_until_closed(&mut trickle, Duration::from_secs(10))
        .await
        .expect("the connection ends");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("bytes a second"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "cut off in time"
    );
    assert!(host.list_keys("slow").await.is_empty(), "nothing stored");

    // Over the limit and waiting for `100 Continue`: the 413 comes at once.
    let mut eager = TcpStream::connect(host.addr).await.unwrap();
    eager
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Expect: 100-continue\r\nContent-Length: 3000000\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), {
        use tokio::io::AsyncReadExt;
        eager.read_exact(&mut head)
    })
    .await
    .expect("an answer before the body")
    .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));

    // Three connections held open: a fourth client waits for one of them.
    drop(eager);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(host.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::spawn({
        // A client of its own: the shared one keeps a connection open.
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", host.base);
        async move {
            let started = std::time::Instant::now();
            let status = http.get(url).send().await.unwrap().status();
            (status, started.elapsed())
        }
    });
    let (status, waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    // Served once the held connections timed out, not before.
    assert!(
        waited >= Duration::from_millis(500),
        "served after {waited:?}"
    );
    drop(held);
    assert_eq!(
        host.http
            .get(format!("{}/healthz", host.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_onto_the_source_object_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let original = fixture("images/storm.jpg");
    let put = host
        .put_object("photos", "a.jpg", original.clone(), "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);
    let result: Value = host
        .http
        .post(host.url("/v1/invoke"))
        .json(&json!({
            "event": {"event_type": "create_object", "bucket_name": "photos", "object_key": "a.jpg"},
            "rule": {"id": "self", "event_types": "create_object", "cloudfunc": "image",
                     "cloudfunc_args": {"action": "resize:w_10|save:b_photos,k_a.jpg"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["status"], "error", "{result}");
    assert_eq!(result["error"]["code"], "operation_failed", "{result}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(message.contains("is the source object itself"), "{message}");
    let kept = host.object_bytes("photos", "a.jpg").await;
    assert!(kept == original, "the original was replaced");
    assert_eq!(
        host.list_keys("photos").await,
        ["a.jpg"],
        "no output either"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_of_a_removed_rule_are_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.workers = 1;
    let host = TestHost::local(config).await;
    let rules = one_rule(json!({
        "id": "big", "event_types": ["create_object"], "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_2400|format:t_webp,q_90", "save_bucket": "out"}}));
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let photo = fixture("images/wood.jpg");
    host.put_jpegs("photos", (0..12).map(|n| format!("{n:02}.jpg")), &photo)
        .await;
    let removed = host
        .http
        .delete(host.url("/photos?notification"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    eventually("the queue drained", || async {
        (host.queue_depth().await == 0).then_some(())
    })
    .await;
    // Those already taken from the queue (one image slot each, four for the
    // one image thread) finish; the rest are skipped. A stop waits for them.
    host.stop().await;
    let written = std::fs::read_dir(dir.path().join("out"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert!(
        (1..=5).contains(&written),
        "{written} outputs after the rule was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_a_replaced_rule_no_longer_takes_are_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.workers = 1;
    let host = TestHost::local(config).await;
    let rule = |filter: &str, save: &str| {
        one_rule(json!({
            "id": "big", "event_types": ["create_object"], "object_filters": [filter],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_2400|format:t_webp,q_90", "save_bucket": save}}))
    };
    assert_eq!(
        host.set_rules("photos", &rule("*.jpg", "out"))
            .await
            .status(),
        200
    );
    let made = host.put_object("other", "note.txt", b"kept".to_vec(), "text/plain");
    assert_eq!(made.await.status(), 201);
    let photo = fixture("images/wood.jpg");
    host.put_jpegs("photos", (0..12).map(|n| format!("{n:02}.jpg")), &photo)
        .await;
    // The same id now takes only PNGs, and saves elsewhere.
    assert_eq!(
        host.set_rules("photos", &rule("*.png", "other"))
            .await
            .status(),
        200
    );
    // Those already taken from the queue finish under the old rule; the rest
    // are skipped, not run with the new rule's arguments. A stop waits for
    // them all.
    host.stop().await;
    let names = |bucket: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join(bucket))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let written = names("out").len();
    assert!(
        (1..=5).contains(&written),
        "{written} outputs of the old rule"
    );
    assert_eq!(names("other"), ["note.txt"], "the new rule ran on JPEGs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_past_its_page_says_so_and_pages_on() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    // 10,005 objects written straight into the store's folder.
    let folder = dir.path().join("many");
    std::fs::create_dir_all(&folder).unwrap();
    for n in 0..10_005 {
        std::fs::write(folder.join(format!("k{n:05}")), b"").unwrap();
    }
    let list = |query: &'static str| {
        let url = host.url(&format!("/many{query}"));
        let http = host.http.clone();
        async move {
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            body
        }
    };
    let first = list("").await;
    assert_eq!(first["keys"].as_array().unwrap().len(), 10_000);
    assert_eq!(first["truncated"], true);
    assert_eq!(first["next_start_after"], "k09999");
    let next = list("?start-after=k09999").await;
    let keys: Vec<&str> = next["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["k10000", "k10001", "k10002", "k10003", "k10004"]);
    assert_eq!(next["truncated"], false);
    assert!(next.get("next_start_after").is_none());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_answer_conditional_and_range_requests() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let bytes: Vec<u8> = (0..600_000u32).map(|n| (n * 7 % 251) as u8).collect();
    let put = host
        .put_object(
            "files",
            "big.bin",
            bytes.clone(),
            "application/octet-stream",
        )
        .await;
    assert_eq!(put.status(), 201);
    let url = host.object_url("files", "big.bin");
    let get = |headers: &[(&str, &str)]| {
        let mut request = host.http.get(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    let whole = get(&[]).await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    let etag = whole.headers()["etag"].to_str().unwrap().to_owned();
    let modified = whole.headers()["last-modified"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert!(modified.ends_with(" GMT"), "{modified}");
    assert!(whole.bytes().await.unwrap() == bytes);
    let head = host.http.head(&url).send().await.unwrap();
    assert_eq!(head.headers()["etag"], etag.as_str());

    // Revalidation: 304 without a body while the object is the same.
    let same = get(&[("if-none-match", &etag)]).await.unwrap();
    assert_eq!(same.status(), 304);
    assert_eq!(same.headers()["etag"], etag.as_str());
    assert!(same.bytes().await.unwrap().is_empty());
    assert_eq!(
        get(&[("if-none-match", "\"other\"")])
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get(&[("if-modified-since", &modified)])
            .await
            .unwrap()
            .status(),
        304
    );
    let before = "Thu, 01 Jan 2015 00:00:00 GMT";
    assert_eq!(
        get(&[("if-modified-since", before)])
            .await
            .unwrap()
            .status(),
        200
    );

    // Ranges: from the middle of the file, an open end, the last bytes.
    for (range, first, last) in [
        ("bytes=300000-300099", 300_000, 300_099),
        ("bytes=599990-", 599_990, 599_999),
        ("bytes=-7", 599_993, 599_999),
        ("bytes=0-0", 0, 0),
        ("bytes=599000-700000", 599_000, 599_999),
        // The unit in any case.
        ("Bytes=10-19", 10, 19),
    ] {
        let part = get(&[("range", range)]).await.unwrap();
        assert_eq!(part.status(), 206, "{range}");
        assert_eq!(
            part.headers()["content-range"],
            format!("bytes {first}-{last}/600000").as_str(),
            "{range}"
        );
        let body = part.bytes().await.unwrap();
        assert!(body[..] == bytes[first..=last], "{range}");
    }
    let outside = get(&[("range", "bytes=600000-")]).await.unwrap();
    assert_eq!(outside.status(), 416);
    assert_eq!(outside.headers()["content-range"], "bytes */600000");
    // Several ranges, or an If-Range of another version: the whole object.
    assert_eq!(
        get(&[("range", "bytes=0-1,5-6")]).await.unwrap().status(),
        200
    );
    let stale = get(&[("range", "bytes=0-1"), ("if-range", "\"old\"")])
        .await
        .unwrap();
    assert_eq!(stale.status(), 200);
    let current = get(&[("range", "bytes=0-1"), ("if-range", &etag)])
        .await
        .unwrap();
    assert_eq!(current.status(), 206);
    // A date cannot tell two writes in one second apart: never a part.
    let dated = get(&[("range", "bytes=0-1"), ("if-range", &modified)])
        .await
        .unwrap();
    assert_eq!(dated.status(), 200);
    // Ranges not understood are ignored, as RFC 9110 says; `-0` asks for
    // no byte.
    for range in [
        "bytes=-",
        "bytes=-x",
        "bytes=+0-+1",
        "bytes=1-0",
        "items=0-1",
    ] {
        let whole = get(&[("range", range)]).await.unwrap();
        assert_eq!(whole.status(), 200, "{range}");
        assert_eq!(whole.bytes().await.unwrap().len(), 600_000, "{range}");
    }
    assert_eq!(get(&[("range", "bytes=-0")]).await.unwrap().status(), 416);

    // A new write is a new version, one of the same size at once after too.
    let mut tag = etag;
    for body in ["changed", "CHANGED"] {
        let put = host
            .put_object("files", "big.bin", body.into(), "application/octet-stream")
            .await;
        assert_eq!(put.status(), 201);
        let fresh = get(&[("if-none-match", &tag)]).await.unwrap();
        assert_eq!(fresh.status(), 200, "{body}");
        tag = fresh.headers()["etag"].to_str().unwrap().to_owned();
        assert_eq!(fresh.bytes().await.unwrap(), body);
    }

    // The last bytes of an empty object: the (empty) whole, not a 416.
    let put = host
        .put_object("files", "empty.bin", Vec::new(), "application/octet-stream")
        .await;
    assert_eq!(put.status(), 201);
    let empty = host
        .http
        .get(host.object_url("files", "empty.bin"))
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 200);
    assert!(empty.bytes().await.unwrap().is_empty());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_images_carry_validators_and_revalidate_without_work() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let photo = fixture("images/storm.jpg");
    let put = host.put_object("photos", "storm.jpg", photo.clone(), "image/jpeg");
    assert_eq!(put.await.status(), 201);
    let get = |action: &str, tag: Option<&str>| {
        let url = format!(
            "{}?image&action={action}",
            host.object_url("photos", "storm.jpg")
        );
        let mut request = host.http.get(url);
        if let Some(tag) = tag {
            request = request.header("if-none-match", tag);
        }
        request.send()
    };
    let first = get("resize:w_40", None).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["cache-control"], "no-cache");
    assert_eq!(
        first.headers()["content-disposition"],
        "inline; filename=\"storm.jpg\"; filename*=UTF-8''storm.jpg"
    );
    // Saved under the extension of the format made, the name in UTF-8.
    let key = "dir/照片 \"1\".jpg";
    let put = host.put_object("photos", key, photo.clone(), "image/jpeg");
    assert_eq!(put.await.status(), 201);
    let webp = host
        .http
        .get(format!(
            "{}?image&action=format:t_webp",
            host.object_url("photos", key)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(webp.status(), 200);
    assert_eq!(webp.headers()["content-type"], "image/webp");
    assert_eq!(
        webp.headers()["content-disposition"],
        "inline; filename=\"__ _1_.webp\"; filename*=UTF-8''%E7%85%A7%E7%89%87%20%221%22.webp"
    );
    assert!(first.headers().contains_key("last-modified"));
    let tag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert!(tag.starts_with("W/\"") && tag.len() == 36, "{tag}");
    let (_, width, _) = decoded(&first.bytes().await.unwrap());
    assert_eq!(width, 40);
    // The same source and action: 304, no body.
    let again = get("resize:w_40", Some(&tag)).await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], tag.as_str());
    assert!(again.bytes().await.unwrap().is_empty());
    // If-Match: a weak tag never matches (RFC 9110's strong comparison),
    // `*` does while the source is there.
    let url = format!(
        "{}?image&action=resize:w_40",
        host.object_url("photos", "storm.jpg")
    );
    for (tag, status) in [("\"nope\"", 412), (tag.as_str(), 412), ("*", 200)] {
        let response = host
            .http
            .get(&url)
            .header("if-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "If-Match: {tag}");
    }
    // Another action is another image.
    let other = get("resize:w_41", Some(&tag)).await.unwrap();
    assert_eq!(other.status(), 200);
    assert_ne!(other.headers()["etag"], tag.as_str());
    // A new source under the key: the old tag no longer holds.
    let put = host.put_object(
        "photos",
        "storm.jpg",
        fixture("images/wood.jpg"),
        "image/jpeg",
    );
    assert_eq!(put.await.status(), 201);
    let changed = get("resize:w_40", Some(&tag)).await.unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"], tag.as_str());
    // A file dated before 1970, which no HTTP date can say: no
    // Last-Modified, and the request still answered.
    let file = std::fs::File::options()
        .write(true)
        .open(dir.path().join("photos/storm.jpg"))
        .unwrap();
    let before_1970 = std::time::UNIX_EPOCH - Duration::from_secs(10 * 365 * 86_400);
    file.set_modified(before_1970).unwrap();
    for url in [
        host.object_url("photos", "storm.jpg"),
        format!(
            "{}?image&action=resize:w_40",
            host.object_url("photos", "storm.jpg")
        ),
    ] {
        let response = host.http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert!(!response.headers().contains_key("last-modified"), "{url}");
        assert!(decoded(&response.bytes().await.unwrap()).1 > 0, "{url}");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_honour_their_preconditions_and_digests() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let url = host.object_url("files", "a.txt");
    let put = |body: &'static str, headers: &[(&str, &str)]| {
        let mut request = host.http.put(&url).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    let stored = || async {
        host.http
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    let tag_of =
        |response: &reqwest::Response| response.headers()["etag"].to_str().unwrap().to_owned();
    // Create only if absent.
    let created = put("v1", &[("if-none-match", "*")]).await.unwrap();
    assert_eq!(created.status(), 201);
    let refused = put("v2", &[("if-none-match", "*")]).await.unwrap();
    assert_error(
        refused,
        412,
        "precondition_failed",
        &["files/a.txt", "If-Match"],
    )
    .await;
    assert_eq!(stored().await, "v1");
    // No Content-Type sent: the key's extension says it, else
    // application/octet-stream.
    let head = host.http.head(&url).send().await.unwrap();
    assert_eq!(head.headers()["content-type"], "text/plain");
    let raw = host.object_url("files", "raw");
    let put_raw = host.http.put(&raw).body("x").send().await.unwrap();
    assert_eq!(put_raw.status(), 201);
    let head = host.http.head(&raw).send().await.unwrap();
    assert_eq!(head.headers()["content-type"], "application/octet-stream");
    // Replace only the version written: the PUT's tag is the one a read
    // gives.
    let etag = tag_of(&created);
    assert_eq!(tag_of(&host.http.head(&url).send().await.unwrap()), etag);
    assert_eq!(
        put("v2", &[("if-match", "\"other\"")])
            .await
            .unwrap()
            .status(),
        412
    );
    assert_eq!(stored().await, "v1");
    let replaced = put("v2", &[("if-match", &etag)]).await.unwrap();
    assert_eq!(replaced.status(), 201);
    assert_eq!(stored().await, "v2");
    let new_tag = tag_of(&replaced);
    assert_ne!(new_tag, etag, "a new version, a new tag");
    assert_eq!(tag_of(&host.http.get(&url).send().await.unwrap()), new_tag);
    assert_eq!(
        put("v3", &[("if-match", &etag)]).await.unwrap().status(),
        412,
        "the tag of the version replaced"
    );
    // A weak tag never matches If-Match; a write after a date is refused.
    let weak = format!("W/{etag}");
    assert_eq!(
        put("v3", &[("if-match", &weak)]).await.unwrap().status(),
        412
    );
    let old = "Thu, 01 Jan 1970 00:00:00 GMT";
    assert_eq!(
        put("v3", &[("if-unmodified-since", old)])
            .await
            .unwrap()
            .status(),
        412
    );
    assert_eq!(stored().await, "v2");

    // Reads: If-Match and If-Unmodified-Since give 412; an If-Modified-Since
    // in the future is ignored.
    let future = "Fri, 01 Jan 2100 00:00:00 GMT";
    for (name, value, status) in [
        ("if-match", "\"other\"", 412),
        ("if-unmodified-since", old, 412),
        ("if-modified-since", future, 200),
    ] {
        let response = host
            .http
            .get(&url)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{name}: {value}");
    }
    // HEAD answers a range as GET does.
    let head = host
        .http
        .head(&url)
        .header("range", "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 206);
    assert_eq!(head.headers()["content-range"], "bytes 0-0/2");
    assert_eq!(head.headers()["content-length"], "1");

    // Delete only the version read; in a missing bucket, 404 either way.
    let delete = host
        .http
        .delete(&url)
        .header("if-match", "\"other\"")
        .send();
    assert_eq!(delete.await.unwrap().status(), 412);
    assert_eq!(stored().await, "v2");
    let elsewhere = host.object_url("nobucket", "a.txt");
    let delete = host.http.delete(&elsewhere).header("if-match", "*").send();
    assert_error(delete.await.unwrap(), 404, "no_such_bucket", &[]).await;
    // A list over two header lines counts whole.
    let two_lines = put("v3", &[("if-none-match", "\"x\""), ("if-none-match", "*")]);
    assert_eq!(two_lines.await.unwrap().status(), 412);
    assert_eq!(stored().await, "v2");

    // Content-MD5: a body changed on the way is refused, nothing stored.
    let md5 = |text: &str| {
        use md5::Digest;
        base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(text.as_bytes()))
    };
    let wrong = put("v4", &[("content-md5", &md5("v5"))]).await.unwrap();
    assert_error(wrong, 400, "bad_digest", &["Content-MD5"]).await;
    let garbage = put("v4", &[("content-md5", "not base64!")]).await.unwrap();
    assert_error(garbage, 400, "invalid_digest", &["Content-MD5"]).await;
    assert_eq!(stored().await, "v2");
    assert_eq!(
        put("v4", &[("content-md5", &md5("v4"))])
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(stored().await, "v4");

    // S3's signed chunks would be stored with their framing: refused.
    let chunked = put(
        "2;chunk-signature=abc\r\nv5\r\n0;chunk-signature=def\r\n\r\n",
        &[
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "2"),
        ],
    )
    .await
    .unwrap();
    assert_error(chunked, 501, "not_supported", &["aws-chunked"]).await;
    assert_eq!(stored().await, "v4");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_of_objects_on_s3_skip_what_the_stream_cannot_seek() {
    let s3 = common::s3::start_s3().await;
    s3.create_bucket("files").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.embedded = false;
    let host = TestHost::start(config, Arc::new(s3.store())).await;
    let bytes: Vec<u8> = (0..300_000u32).map(|n| (n * 13 % 253) as u8).collect();
    let put = host
        .put_object("files", "b.bin", bytes.clone(), "application/octet-stream")
        .await;
    assert_eq!(put.status(), 201);
    let part = host
        .http
        .get(host.object_url("files", "b.bin"))
        .header("range", "bytes=250000-250010")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        "bytes 250000-250010/300000"
    );
    // The server's own ETag, not one made of a time to the second.
    let head = s3
        .client()
        .head_object()
        .bucket("files")
        .key("b.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(part.headers()["etag"], head.e_tag().unwrap());
    let body = part.bytes().await.unwrap();
    assert!(body[..] == bytes[250_000..=250_010]);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_saving_into_each_others_buckets_never_replace_an_original() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    // Each rule writes the key it read into the other's bucket.
    for (bucket, other) in [("paa", "pbb"), ("pbb", "paa")] {
        let rules = one_rule(json!({
            "id": format!("to-{other}"), "event_types": ["create_object"], "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_50", "key_prefix": "", "key_seprate": "",
                               "save_bucket": other}}));
        assert_eq!(host.set_rules(bucket, &rules).await.status(), 200);
    }
    let original = fixture("images/storm.jpg");
    let put = host
        .put_object("paa", "o.jpg", original.clone(), "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);
    // paa's rule writes pbb/o.jpg; its event runs pbb's rule, whose output
    // would be paa/o.jpg, the original.
    eventually("pbb/o.jpg written", || async {
        host.list_keys("pbb")
            .await
            .contains(&"o.jpg".to_string())
            .then_some(())
    })
    .await;
    // A stop waits for every job queued or running, and for the events
    // their outputs fire.
    host.stop().await;
    let kept = std::fs::read(dir.path().join("paa/o.jpg")).unwrap();
    assert!(kept == original, "the original was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_at_once_are_capped_and_their_memory_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.body_memory = 1 << 20;
    config.max_object_bytes = 4 << 20;
    let host = TestHost::local(config).await;
    // Within the object limit, but more than all bodies may hold at once.
    let refused = host
        .put_object(
            "docs",
            "big.bin",
            vec![7; 2 << 20],
            "application/octet-stream",
        )
        .await;
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_error(refused, 503, "busy", &["1 MiB"]).await;
    assert!(host.list_keys("docs").await.is_empty(), "nothing stored");
    // Bodies that fit, one after the other: each gives its share back.
    for n in 0..6 {
        let key = format!("part-{n}.bin");
        let stored = host
            .put_object("docs", &key, vec![n; 600 << 10], "application/octet-stream")
            .await;
        assert_eq!(stored.status(), 201, "{key}");
        assert_eq!(host.object_bytes("docs", &key).await.len(), 600 << 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_operations_the_api_lacks_are_refused_and_change_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let original = b"the original bytes".to_vec();
    let put = host
        .put_object(
            "files",
            "a.bin",
            original.clone(),
            "application/octet-stream",
        )
        .await;
    assert_eq!(put.status(), 201);
    let url = |path: &str| format!("{}{path}", host.base);

    // A server-side copy (S3's CopyObject) would have stored nothing as b.
    let copy = host
        .http
        .put(url("/files/b.bin"))
        .header("x-amz-copy-source", "/files/a.bin")
        .send()
        .await
        .unwrap();
    assert_error(copy, 501, "not_supported", &["x-amz-copy-source"]).await;
    // Tags put, then deleted: the object itself is neither overwritten nor
    // deleted.
    let tag = host
        .http
        .put(url("/files/a.bin?tagging"))
        .body("<Tagging><TagSet/></Tagging>")
        .send()
        .await
        .unwrap();
    assert_error(
        tag,
        501,
        "not_supported",
        &["`?tagging`", "PUT /{bucket}/{key}"],
    )
    .await;
    // The copy's source in a presigned URL, and `?image` on a write.
    for path in [
        "/files/b.bin?x-amz-copy-source=%2Ffiles%2Fa.bin&X-Amz-Signature=00",
        "/files/b.bin?image&action=info",
    ] {
        let put = host.http.put(url(path)).send().await.unwrap();
        assert_error(put, 501, "not_supported", &[]).await;
    }
    for path in ["/files/a.bin?tagging", "/files/a.bin?uploadId=7"] {
        let delete = host.http.delete(url(path)).send().await.unwrap();
        assert_error(delete, 501, "not_supported", &["DELETE /{bucket}/{key}"]).await;
    }
    for (path, route) in [
        ("/files/a.bin?acl", "GET /{bucket}/{key}"),
        ("/files/a.bin?partNumber=2", "GET /{bucket}/{key}"),
        ("/files?location", "GET /{bucket}"),
        ("/files?delimiter=/", "GET /{bucket}"),
        ("/files?marker=a.bin", "GET /{bucket}"),
    ] {
        let get = host.http.get(url(path)).send().await.unwrap();
        assert_error(get, 501, "not_supported", &[route]).await;
    }
    let policy = host
        .http
        .put(url("/files?policy"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(policy, 501, "not_supported", &["`?policy`"]).await;

    // A bad bucket is named first.
    let bad = host.http.get(url("/Files?acl")).send().await.unwrap();
    assert_error(bad, 400, "invalid_bucket", &[]).await;

    // A cache buster on a read changes nothing, nor do the plain object's
    // own part and version that SDKs ask for.
    for query in ["v=2", "partNumber=1", "versionId=null", "x-id=GetObject"] {
        let read = host
            .http
            .get(url(&format!("/files/a.bin?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200, "{query}");
        assert_eq!(read.bytes().await.unwrap(), original, "{query}");
    }
    // The keys of signed URLs (AWS's, old and new, and QingStor's) and
    // the SDKs' `x-id` are taken on a write.
    for query in [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=00",
        "AWSAccessKeyId=K&Signature=S&Expires=1",
        "access_key_id=K&signature=S&expires=1",
        "x-id=PutObject",
    ] {
        let signed = host
            .http
            .put(url(&format!("/files/c.bin?{query}")))
            .body("signed")
            .send()
            .await
            .unwrap();
        assert_eq!(signed.status(), 201, "{query}");
    }
    let put = host.put_object("files", "d.bin", b"d".to_vec(), "text/plain");
    assert_eq!(put.await.status(), 201);
    let delete = host
        .http
        .delete(url("/files/d.bin?x-id=DeleteObject"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);

    // What the headers refuse is refused before the body: a client waiting
    // for `100 Continue` gets the answer instead, and sends nothing.
    for (request, status) in [
        (
            "PUT /files/a.bin HTTP/1.1\r\nIf-None-Match: *\r\n",
            "HTTP/1.1 412",
        ),
        ("PUT /files/a.bin?tagging HTTP/1.1\r\n", "HTTP/1.1 501"),
        ("PUT /files?lifecycle HTTP/1.1\r\n", "HTTP/1.1 501"),
        ("PUT /Files/a.bin HTTP/1.1\r\n", "HTTP/1.1 400"),
        (
            "PUT /files/a.bin HTTP/1.1\r\nContent-Encoding: aws-chunked\r\n",
            "HTTP/1.1 501",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(host.addr).await.unwrap();
        stream
            .write_all(
                format!(
                    "{request}Host: x\r\nExpect: 100-continue\r\nContent-Length: 100000000\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
            .await
            .expect("an answer before the body")
            .unwrap();
        assert_eq!(
            &head,
            status.as_bytes(),
            "{request}: {}",
            String::from_utf8_lossy(&head)
        );
    }

    let mut keys = host.list_keys("files").await;
    keys.sort();
    assert_eq!(keys, ["a.bin", "c.bin"]);
    host.stop().await;
    let kept = std::fs::read(dir.path().join("files/a.bin")).unwrap();
    assert_eq!(kept, original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_s3_checksums_are_checked_against_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let body = "checked bytes";
    // The body's checksums, as S3 SDKs send them (made with Python's zlib
    // and hashlib).
    let crc32 = "wJMHWA==";
    let sha256 = "wkB1kAjlkhAHKBKSjYvskHS7sMKAFemJI0eLiAJJS2U=";
    let sha256_hex = "c240759008e59210072812928d8bec9074bbb0c28015e98923478b8802494b65";
    let sha1 = "JtaGkQ/shKZwAi09ilLwT/14zPg=";
    let put = |key: &str, headers: &[(&str, &str)]| {
        let mut request = host.http.put(host.object_url("files", key)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    for (key, headers) in [
        ("crc32", vec![("x-amz-checksum-crc32", crc32)]),
        (
            "sha",
            vec![
                ("x-amz-checksum-sha256", sha256),
                ("x-amz-checksum-sha1", sha1),
                ("x-amz-content-sha256", sha256_hex),
                ("x-amz-checksum-algorithm", "SHA256"),
            ],
        ),
        (
            "unsigned",
            vec![("x-amz-content-sha256", "UNSIGNED-PAYLOAD")],
        ),
    ] {
        assert_eq!(put(key, &headers).await.unwrap().status(), 201, "{key}");
    }
    // A checksum of other bytes, or of an algorithm S3 lacks: nothing is
    // stored.
    let other = "AAAAAA==";
    for (key, header, value, code) in [
        ("bad-crc", "x-amz-checksum-crc32", other, "bad_digest"),
        ("bad-crc32c", "x-amz-checksum-crc32c", other, "bad_digest"),
        ("bad-sha", "x-amz-checksum-sha256", crc32, "bad_digest"),
        (
            "bad-hex",
            "x-amz-content-sha256",
            &"0".repeat(64),
            "bad_digest",
        ),
        ("bad-md5", "x-amz-checksum-md5", crc32, "invalid_digest"),
        (
            "bad-b64",
            "x-amz-checksum-crc32",
            "not base64!",
            "invalid_digest",
        ),
    ] {
        let response = put(key, &[(header, value)]).await.unwrap();
        assert_error(response, 400, code, &[header]).await;
    }
    let mut keys = host.list_keys("files").await;
    keys.sort();
    assert_eq!(keys, ["crc32", "sha", "unsigned"]);
    host.stop().await;
}

/// Matching events against a bucket's filters can take milliseconds an
/// event (patterns that run as regular expressions), so it runs off the
/// async workers: two such requests at once leave the server answering
/// others. A request is bounded in its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_events_leaves_the_server_answering_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    // The bucket's whole pattern budget in the costliest kind of glob.
    let filters: Vec<String> = (0..8)
        .map(|i| format!("*a{}*a{}c", "?".repeat(120 - i), "?".repeat(120 - i)))
        .collect();
    let rules = json!({"notifications": [{
        "id": "hooks", "event_types": ["create_object"], "object_filters": filters,
        "cloudfunc": "notifier", "notify_url": "http://127.0.0.1:1/hook"}]});
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    // Long keys that no pattern matches (none ends in `c`).
    let mut seed = 7u32;
    let mut events = |n: usize| -> Value {
        let list: Vec<Value> = (0..n)
            .map(|_| {
                let key: String = (0..1000)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        if seed >> 31 == 0 { 'a' } else { 'b' }
                    })
                    .collect();
                json!({"event_type": "create_object", "bucket_name": "photos",
                       "object_key": key})
            })
            .collect();
        Value::Array(list)
    };
    let heavy = events(150);
    let post = |body: Value| {
        let (http, url) = (host.http.clone(), host.url("/v1/events"));
        tokio::spawn(async move {
            let response = http.post(url).json(&body).send().await.unwrap();
            (response.status(), std::time::Instant::now())
        })
    };
    let (first, second) = (post(heavy.clone()), post(heavy));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health = host.http.get(host.url("/healthz")).send().await.unwrap();
    let answered = std::time::Instant::now();
    assert_eq!(health.status(), 200);
    for matched in [first, second] {
        let (status, done) = matched.await.unwrap();
        assert_eq!(status, 202);
        assert!(done > answered, "/healthz waited for the matching");
    }
    // Over the bound: refused whole, naming it.
    let response = host.post_events(&events(1001)).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "too_many_events", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("1001 events"),
        "{body}"
    );
    host.stop().await;
}

/// `?image` behind a cache: a condition is judged only for a request that
/// would succeed (a bad action is its error, not a 304), a tag names the
/// limits it was made under, `image_max_age` lets proxies store the answer,
/// and a made image being sent counts against the bodies' memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_images_behind_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let url = |host: &TestHost, key: &str, action: &str| {
        format!("{}?image&action={action}", host.object_url("photos", key))
    };
    let mut config = test_config(dir.path());
    config.image_max_age = Duration::from_secs(3600);
    let host = TestHost::local(config).await;
    let photo = fixture("images/storm.jpg");
    let put = host.put_object("photos", "storm.jpg", photo.clone(), "image/jpeg");
    assert_eq!(put.await.status(), 201);
    let put = host.put_object("photos", "note.jpg", b"not an image".to_vec(), "image/jpeg");
    assert_eq!(put.await.status(), 201);
    let first = host
        .http
        .get(url(&host, "storm.jpg", "resize:w_40"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["cache-control"], "public, max-age=3600");
    let tag = first.headers()["etag"].to_str().unwrap().to_owned();
    let since = first.headers()["last-modified"]
        .to_str()
        .unwrap()
        .to_owned();
    // Conditions on requests that fail: their errors.
    for (key, action, header, value, status) in [
        (
            "storm.jpg",
            "resize:w_20000",
            "if-modified-since",
            since.as_str(),
            413,
        ),
        ("note.jpg", "resize:w_40", "if-none-match", "*", 422),
        (
            "note.jpg",
            "resize:w_40",
            "if-modified-since",
            since.as_str(),
            422,
        ),
        ("storm.jpg", "resize:w_20000", "if-match", "\"nope\"", 413),
    ] {
        let response = host
            .http
            .get(url(&host, key, action))
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{key} {action} {header}");
    }
    // On one that succeeds: 304 by date too, once the image is made.
    let by_date = host
        .http
        .get(url(&host, "storm.jpg", "resize:w_40"))
        .header("if-modified-since", &since)
        .send()
        .await
        .unwrap();
    assert_eq!(by_date.status(), 304);
    assert_eq!(by_date.headers()["etag"], tag.as_str());
    host.stop().await;

    // The same source and action under other limits: another tag, so a
    // cache revalidating the old one gets the new answer.
    let mut config = test_config(dir.path());
    config.limits.max_output_side = 8000;
    // Room for one 64 KiB unit of bodies: a made image larger than that is
    // refused while it would be sent, as a body would be while received.
    config.body_memory = 64 << 10;
    let host = TestHost::local(config).await;
    let again = host
        .http
        .get(url(&host, "storm.jpg", "resize:w_40"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_ne!(again.headers()["etag"], tag.as_str());
    assert_eq!(again.headers()["cache-control"], "no-cache");
    let large = host
        .http
        .get(url(&host, "storm.jpg", "format:t_png"))
        .send()
        .await
        .unwrap();
    assert_eq!(large.status(), 503);
    assert_eq!(large.headers()["retry-after"], "1");
    let body: Value = large.json().await.unwrap();
    assert_eq!(body["code"], "busy", "{body}");
    host.stop().await;
}
