//! The function host end to end: events in over HTTP, objects out in a real
//! store (an S3-protocol server or the embedded local directory), results
//! POSTed to a real HTTP receiver, retries, dead letters, the loop guard
//! and a graceful shutdown.

use crate::common;

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use common::host::{
    Behaviour, QUIET, Receiver, TestHost, decoded, eventually, fixture, test_config,
};
use common::s3::start_s3;
use imgfunc::host::HostConfig;
use serde_json::{Value, json};

/// An image rule for the objects matching `filter` that notifies `url`.
fn image_rule(id: &str, filter: &str, action: &str, url: &str) -> Value {
    json!({"notifications": [{
        "id": id,
        "event_types": ["create_object"],
        "object_filters": [filter],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": action},
        "notify_url": url,
    }]})
}

/// A MinIO webhook body for one uploaded object, as MinIO sends it: the key
/// form-encoded (`+` for a space), the top-level `Key` repeating it.
fn minio_put_event(bucket: &str, encoded_key: &str, size: usize, etag: &str) -> Value {
    json!({
        "EventName": "s3:ObjectCreated:Put",
        "Key": format!("{bucket}/{}", encoded_key.replace('+', "%20")),
        "Records": [{
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2024-05-01T10:00:00.123Z",
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-id-2": "dd9025bab4ad464b", "x-amz-request-id": "17C9A8B1C0D1E2F3"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"}, "arn": format!("arn:aws:s3:::{bucket}")},
                "object": {
                    "key": encoded_key,
                    "size": size,
                    "eTag": etag,
                    "contentType": "image/jpeg",
                    "userMetadata": {"content-type": "image/jpeg"},
                    "sequencer": "17C9A8B1C0D1E2F4"
                }
            },
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"}
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minio_event_on_s3_writes_the_output_and_notifies() {
    let s3 = start_s3().await;
    s3.create_bucket("photos").await;
    let client = s3.client();
    let original = fixture("images/storm.jpg");
    let put = client
        .put_object()
        .bucket("photos")
        .key("a b.jpg")
        .content_type("image/jpeg")
        .body(ByteStream::from(original.clone()))
        .send()
        .await
        .expect("upload through aws-sdk-s3");
    let etag = put
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();

    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.embedded = false;
    let host = TestHost::start(config, std::sync::Arc::new(s3.store())).await;
    let rules = image_rule(
        "thumbs",
        "*.jpg",
        "resize:w_240|format:t_webp",
        &receiver.url,
    );
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);

    let event = minio_put_event("photos", "a+b.jpg", original.len(), &etag);
    let response = host.post_events(&event).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["unmatched"], 0);
    assert_eq!(accepted["skipped"], json!([]));
    let invocations = accepted["invocations"].as_array().unwrap();
    assert_eq!(invocations.len(), 1, "{accepted}");
    assert_eq!(invocations[0]["rule_id"], "thumbs");
    assert_eq!(invocations[0]["bucket"], "photos");
    assert_eq!(invocations[0]["key"], "a b.jpg", "the + decodes to a space");
    assert_eq!(invocations[0]["event_type"], "create_object");
    let id = invocations[0]["id"].as_str().unwrap().to_string();

    let payload = receiver.wait_for_invocations(&[id]).await.remove(0);

    let head = client
        .head_object()
        .bucket("photos")
        .key("gen_a b.jpg")
        .send()
        .await
        .expect("the output exists under gen_a b.jpg");
    assert_eq!(head.content_type(), Some("image/webp"));
    assert_eq!(
        head.metadata().and_then(|m| m.get("imgfunc-chain")),
        Some(&"photos:thumbs".to_string()),
        "the output names the rule that made it"
    );
    let output = client
        .get_object()
        .bucket("photos")
        .key("gen_a b.jpg")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(decoded(&output), ("webp".to_string(), 240, 160));
    assert_eq!(head.content_length(), Some(output.len() as i64));

    assert_eq!(payload["rule_id"], "thumbs");
    assert_eq!(payload["cloudfunc"], "image");
    assert_eq!(payload["status"], "ok");
    // The record's size and ETag, as the S3 server gave them.
    assert_eq!(
        payload["event"],
        json!({"bucket": "photos", "key": "a b.jpg", "type": "create_object",
               "size": original.len(), "etag": etag})
    );
    assert_eq!(
        payload["outputs"],
        json!([{
            "bucket": "photos",
            "key": "gen_a b.jpg",
            "content_type": "image/webp",
            "bytes": output.len(),
            "width": 240,
            "height": 160,
        }])
    );
    assert!(payload.get("error").is_none(), "{payload}");
    assert!(payload["duration_ms"].as_f64().unwrap() > 0.0, "{payload}");
    assert!(payload["queue_ms"].as_f64().unwrap() >= 0.0, "{payload}");

    // Outputs written to an external store fire no events of the host's
    // own: nothing else arrives.
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.bodies().len(), 1, "{:?}", receiver.bodies());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_retries_after_a_500_and_delivers_once() {
    let receiver = Receiver::start(Behaviour::FailFirst(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let rules = image_rule("thumbs", "in/*", "resize:w_100", &receiver.url);
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let put = host
        .put_object(
            "photos",
            "in/a.jpg",
            fixture("images/storm.jpg"),
            "image/jpeg",
        )
        .await;
    assert_eq!(put.status(), 201);

    let bodies = receiver.wait_for(1).await;
    assert_eq!(bodies[0]["status"], "ok");
    assert_eq!(bodies[0]["event"]["key"], "in/a.jpg");
    assert_eq!(bodies[0]["outputs"][0]["key"], "gen_in/a.jpg");
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.hits(), 2, "one 500, then one success");
    assert_eq!(receiver.bodies().len(), 1, "delivered exactly once");
    let dead_letter = host.dead_letter_path();
    host.stop().await;
    assert!(
        !dead_letter.exists(),
        "a delivered payload is not a dead letter: {}",
        std::fs::read_to_string(&dead_letter).unwrap_or_default()
    );
}

/// A host with rule `thumbs` (`action` on `photos/in/*`, results to
/// `receiver`) and `in/a.jpg` uploaded, which fires it.
async fn upload_under_thumbs_rule(
    config: HostConfig,
    action: &str,
    receiver: &Receiver,
) -> TestHost {
    let host = TestHost::local(config).await;
    let rules = image_rule("thumbs", "in/*", action, &receiver.url);
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let put = host
        .put_object(
            "photos",
            "in/a.jpg",
            fixture("images/storm.jpg"),
            "image/jpeg",
        )
        .await;
    assert_eq!(put.status(), 201);
    host
}

/// The dead-letter file's records, once there are `n` of them.
async fn dead_letters(path: &std::path::Path, n: usize) -> Vec<Value> {
    eventually(&format!("{n} dead-letter record(s)"), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each dead letter is a JSON line"))
            .collect();
        std::future::ready((records.len() >= n).then_some(records))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_to_a_hanging_receiver_ends_in_the_dead_letter_file() {
    let receiver = Receiver::start(Behaviour::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.notify.attempts = 2;
    config.notify.timeout = Duration::from_millis(300);
    config.notify.delay = Duration::from_millis(100);
    let host = upload_under_thumbs_rule(config, "resize:w_100|format:t_png", &receiver).await;

    let records = dead_letters(&host.dead_letter_path(), 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["url"], receiver.url);
    assert_eq!(record["attempts"], 2);
    assert!(
        record["last_error"].as_str().unwrap().contains("300ms"),
        "the last error says the receiver did not answer in time: {record}"
    );
    assert!(record["time"].as_str().unwrap().ends_with('Z'), "{record}");
    let payload = &record["payload"];
    assert_eq!(payload["rule_id"], "thumbs");
    assert_eq!(payload["status"], "ok");
    // The upload's own event carries its size (the embedded store has no
    // ETag to give).
    assert_eq!(
        payload["event"],
        json!({"bucket": "photos", "key": "in/a.jpg", "type": "create_object",
               "size": fixture("images/storm.jpg").len()})
    );
    assert_eq!(payload["outputs"][0]["key"], "gen_in/a.jpg");
    assert_eq!(payload["outputs"][0]["content_type"], "image/png");
    assert_eq!(payload["outputs"][0]["width"], 100);
    assert!(payload["invocation_id"].is_string());
    assert!(payload["duration_ms"].is_number());
    assert_eq!(receiver.hits(), 2, "exactly the configured attempts");
    assert!(receiver.bodies().is_empty());
    host.stop().await;
}

/// A notifier rule on bucket `busy` whose results go to `receiver`, and
/// five events for it; returns once two requests are at the receiver
/// (the host's room for deliveries is two).
async fn five_notifications_two_at_a_time(host: &TestHost, receiver: &Receiver) {
    let rules = json!({"notifications": [{
        "id": "hook", "event_types": ["create_object"],
        "cloudfunc": "notifier", "notify_url": receiver.url}]});
    assert_eq!(host.set_rules("busy", &rules).await.status(), 200);
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"event_type": "create_object", "bucket_name": "busy", "object_key": format!("{i}.jpg")}))
        .collect();
    assert_eq!(host.post_events(&json!(events)).await.status(), 202);
    eventually("two requests at the receiver", || {
        std::future::ready((receiver.hits() == 2).then_some(()))
    })
    .await;
}

/// The dead-letter records of those five events, one each.
async fn five_dead_letters(path: &std::path::Path) -> Vec<Value> {
    let records = dead_letters(path, 5).await;
    assert_eq!(records.len(), 5, "{records:?}");
    let mut keys: Vec<&str> = records
        .iter()
        .map(|r| r["payload"]["event"]["key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg"]);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_under_way_are_bounded_and_the_rest_wait_their_turn() {
    // A receiver that never answers holds each delivery for its whole
    // timeout; with room for two, two requests are open at a time, the
    // other invocations wait for their turn, and every payload still ends
    // in the dead-letter file.
    let receiver = Receiver::start(Behaviour::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.notify.attempts = 1;
    // Long enough that the two first requests are seen, and the check
    // below made, well before they time out on a busy machine.
    config.notify.timeout = Duration::from_millis(1500);
    config.notify.max_in_flight = 2;
    let host = TestHost::local(config).await;
    five_notifications_two_at_a_time(&host, &receiver).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.hits(), 2, "no third request while two are open");

    five_dead_letters(&host.dead_letter_path()).await;
    assert_eq!(receiver.hits(), 5, "one attempt each, two at a time");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_keeps_notifications_still_waiting_for_their_turn() {
    // Two deliveries hang at the receiver and three wait for room when the
    // drain timeout ends: all five payloads are kept.
    let receiver = Receiver::start(Behaviour::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.notify.timeout = Duration::from_secs(5);
    config.notify.max_in_flight = 2;
    config.drain_timeout = Duration::from_millis(300);
    let host = TestHost::local(config).await;
    five_notifications_two_at_a_time(&host, &receiver).await;
    let path = host.dead_letter_path();
    host.stop().await;

    let records = five_dead_letters(&path).await;
    assert!(
        records
            .iter()
            .all(|r| r["last_error"].as_str().unwrap().contains("shutdown"))
    );
    assert_eq!(receiver.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_keeps_notifications_it_cannot_wait_for() {
    // The receiver never answers and each attempt may take 5 s, but the
    // host drains for 300 ms only: the payload under way is kept in the
    // dead-letter file rather than dropped with the process.
    let receiver = Receiver::start(Behaviour::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.notify.timeout = Duration::from_secs(5);
    config.drain_timeout = Duration::from_millis(300);
    let host = upload_under_thumbs_rule(config, "resize:w_100", &receiver).await;
    eventually("the first attempt", || {
        std::future::ready((receiver.hits() > 0).then_some(()))
    })
    .await;
    let path = host.dead_letter_path();
    assert!(!path.exists(), "nothing is kept while the delivery runs");
    host.stop().await;

    let text = std::fs::read_to_string(&path).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["url"], receiver.url);
    assert_eq!(record["attempts"], 1);
    assert!(
        record["last_error"].as_str().unwrap().contains("shutdown"),
        "{record}"
    );
    assert_eq!(record["payload"]["rule_id"], "thumbs");
    assert_eq!(record["payload"]["outputs"][0]["key"], "gen_in/a.jpg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_guard_keeps_a_rule_off_its_own_outputs() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let rules = json!({"notifications": [{
        "id": "everything",
        "event_types": ["create_object"],
        "object_filters": ["*"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_64", "save_bucket": "loop"},
        "notify_url": receiver.url,
    }]});
    assert_eq!(host.set_rules("loop", &rules).await.status(), 200);
    let put = host
        .put_object("loop", "x.jpg", fixture("images/storm.jpg"), "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);

    // The host's own write of gen_x.jpg fires create_object like an upload
    // does, but the rule is in the output's chain, so it does not run again
    // and reports nothing.
    let bodies = receiver.wait_for(1).await;
    tokio::time::sleep(QUIET).await;
    let bodies_after = receiver.bodies();
    assert_eq!(bodies_after.len(), 1, "nothing loops: {bodies_after:?}");
    let ok = &bodies[0];
    assert_eq!(ok["event"]["key"], "x.jpg");
    assert_eq!(ok["status"], "ok");
    assert_eq!(ok["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(ok["outputs"][0]["key"], "gen_x.jpg");

    assert_eq!(host.list_keys("loop").await, ["gen_x.jpg", "x.jpg"]);
    let head = host
        .http
        .head(host.object_url("loop", "gen_x.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["x-amz-meta-imgfunc-chain"],
        "loop:everything"
    );
    let missing = host
        .http
        .get(host.object_url("loop", "gen_gen_x.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_guard_holds_for_any_rule_id_and_key() {
    // Rule ids and keys go into the outputs' metadata: a comma in an id
    // must not split its chain link (the rule would run on its own
    // outputs), and non-ASCII ids or a key ending in a space must still
    // make valid metadata (or every write would fail).
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let cases = [
        (
            "ids1",
            "缩略图,small",
            "x.jpg",
            "ids1:%E7%BC%A9%E7%95%A5%E5%9B%BE%2Csmall",
            "ids1/x.jpg",
        ),
        ("ids2", "a,b", "y.jpg", "ids2:a%2Cb", "ids2/y.jpg"),
        (
            "ids3",
            "thumbs 2",
            "z.jpg ",
            "ids3:thumbs%202",
            "ids3/z.jpg%20",
        ),
    ];
    for (bucket, id, key, _, _) in cases {
        let rules = json!({"notifications": [{
            "id": id,
            "event_types": ["create_object"],
            "object_filters": ["*"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_64"},
            "notify_url": receiver.url,
        }]});
        assert_eq!(host.set_rules(bucket, &rules).await.status(), 200);
        let put = host
            .put_object(bucket, key, fixture("images/storm.jpg"), "image/jpeg")
            .await;
        assert_eq!(put.status(), 201);
    }
    receiver.wait_for(cases.len()).await;
    tokio::time::sleep(QUIET).await;
    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), cases.len(), "nothing loops: {bodies:?}");
    assert!(bodies.iter().all(|b| b["status"] == "ok"), "{bodies:?}");
    for (bucket, _, key, chain, source) in cases {
        let output = format!("gen_{key}");
        assert_eq!(host.list_keys(bucket).await, [output.as_str(), key]);
        let head = host
            .http
            .head(host.object_url(bucket, &output))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["x-amz-meta-imgfunc-chain"], chain);
        assert_eq!(head.headers()["x-amz-meta-imgfunc-source"], source);
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rules_saving_into_each_others_buckets_stop_after_one_round() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    for (bucket, other) in [("left", "right"), ("right", "left")] {
        let rules = json!({"notifications": [{
            "id": "mirror",
            "event_types": ["create_object"],
            "object_filters": ["*"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": "resize:w_32", "save_bucket": other},
            "notify_url": receiver.url,
        }]});
        assert_eq!(host.set_rules(bucket, &rules).await.status(), 200);
    }
    let put = host
        .put_object("left", "x.jpg", fixture("images/storm.jpg"), "image/jpeg")
        .await;
    assert_eq!(put.status(), 201);
    receiver.wait_for(2).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.bodies().len(), 2, "{:?}", receiver.bodies());
    assert_eq!(host.list_keys("left").await, ["gen_gen_x.jpg", "x.jpg"]);
    assert_eq!(host.list_keys("right").await, ["gen_x.jpg"]);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_queued_work_before_run_returns() {
    // More than the four invocations one worker keeps in flight.
    const UPLOADS: usize = 7;
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.workers = 1;
    let host = TestHost::local(config).await;
    // Upscaling and PNG-encoding keeps the single worker busy long enough
    // that most jobs are still queued when shutdown starts.
    let rules = image_rule("big", "in/*", "resize:w_960|format:t_png", &receiver.url);
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let original = fixture("images/wood.jpg");
    let first_put = std::time::Instant::now();
    for i in 0..UPLOADS {
        let put = host
            .put_object(
                "photos",
                &format!("in/{i}.jpg"),
                original.clone(),
                "image/jpeg",
            )
            .await;
        assert_eq!(put.status(), 201);
    }
    let depth = host.queue_depth().await;
    assert!(depth > 0, "jobs are still queued when shutdown starts");

    let data_dir = host.data_dir.clone();
    let addr = host.addr;
    host.stop().await;
    let wall_ms = first_put.elapsed().as_secs_f64() * 1e3;

    // `run` returned: every queued job ran and its notification went out.
    for i in 0..UPLOADS {
        let path = data_dir.join("photos").join(format!("gen_in/{i}.jpg"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{} written before run returned: {e}", path.display()));
        assert_eq!(decoded(&bytes), ("png".to_string(), 960, 720));
    }
    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), UPLOADS, "{bodies:?}");
    assert!(bodies.iter().all(|b| b["status"] == "ok"), "{bodies:?}");
    // One image thread runs one image at a time, and an invocation that
    // waits for it counts that as queued, not running: the running times
    // add up to no more than the whole (four in flight counting their
    // waits would add up to about four times it).
    let ms = |b: &Value, field: &str| b[field].as_f64().unwrap();
    let running: f64 = bodies.iter().map(|b| ms(b, "duration_ms")).sum();
    assert!(
        running < wall_ms * 1.3,
        "{running} ms running in {wall_ms} ms: {bodies:?}"
    );
    assert!(
        bodies
            .iter()
            .all(|b| ms(b, "duration_ms") + ms(b, "queue_ms") < wall_ms),
        "{bodies:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the host no longer accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_forge_the_loop_guard_chain() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let rules = json!({"notifications": [{
        "id": "thumbs",
        "event_types": ["create_object"],
        "cloudfunc": "image",
        "cloudfunc_args": {"action": "resize:w_40"},
        "notify_url": receiver.url,
    }]});
    assert_eq!(host.set_rules("forged", &rules).await.status(), 200);
    let put = host
        .http
        .put(host.object_url("forged", "x.jpg"))
        .header("content-type", "image/jpeg")
        .header("x-amz-meta-imgfunc-chain", "forged:thumbs")
        .header("x-amz-meta-owner", "alice")
        .body(fixture("images/storm.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let bodies = receiver.wait_for(1).await;
    assert_eq!(bodies[0]["status"], "ok", "{:?}", bodies[0]);
    let head = host
        .http
        .head(host.object_url("forged", "x.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.headers()["x-amz-meta-owner"], "alice");
    assert!(head.headers().get("x-amz-meta-imgfunc-chain").is_none());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_does_not_hold_the_shutdown_past_its_drain_timeout() {
    use tokio::io::AsyncWriteExt;
    // A client that sends half an upload and then nothing: the shutdown
    // waits the drain timeout for it, then goes on, and the half object is
    // not stored.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.drain_timeout = Duration::from_millis(500);
    let host = TestHost::local(config).await;
    let mut client = tokio::net::TcpStream::connect(host.addr).await.unwrap();
    client
        .write_all(b"PUT /photos/half.jpg HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    client.write_all(&[0u8; 50_000]).await.unwrap();
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let data_dir = host.data_dir.clone();
    let started = std::time::Instant::now();
    host.stop().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "the open request was given its drain time: {took:?}"
    );
    assert!(
        !data_dir.join("photos/half.jpg").exists(),
        "half an upload is not an object"
    );
    // Cut off, not left open through the rest of the shutdown: the client
    // reads the end of the connection.
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection is still open");
}

/// A watermark server on 127.0.0.1 that counts its GETs and answers none
/// until `open` is called: an 8x8 opaque red PNG.
struct GatedMark {
    url: String,
    gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    server: tokio::task::JoinHandle<()>,
}

impl GatedMark {
    async fn start() -> GatedMark {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut png = Vec::new();
        image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 255]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let gets = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (g, s) = (gets.clone(), gate.clone());
        let app = axum::Router::new().route(
            "/logo.png",
            axum::routing::get(move || {
                let (g, s, png) = (g.clone(), s.clone(), png.clone());
                async move {
                    g.fetch_add(1, Ordering::SeqCst);
                    // Waits until the test opens the gate (then never again).
                    let _ = s.acquire().await.map(|p| p.forget());
                    s.add_permits(1);
                    png
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/logo.png", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GatedMark {
            url,
            gets,
            gate,
            server,
        }
    }

    fn open(&self) {
        self.gate.add_permits(1);
    }

    fn gets(&self) -> usize {
        self.gets.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Puts `photo` under `{prefix}{i:02}.jpg` for each `i`.
async fn put_photos(
    host: &TestHost,
    bucket: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    photo: &[u8],
) {
    for i in range {
        let key = format!("{prefix}{i:02}.jpg");
        let put = host
            .put_object(bucket, &key, photo.to_vec(), "image/jpeg")
            .await;
        assert_eq!(put.status(), 201, "PUT {bucket}/{key}");
    }
}

/// Rules for bucket `photos`: every upload gets the watermark at
/// `mark_url` laid at (0, 0), saved as PNG to `out`, the result sent to
/// `notify_url`.
fn marked_rule(mark_url: &str, notify_url: &str) -> Value {
    use base64::Engine as _;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mark_url);
    json!({"notifications": [{
        "id": "marked",
        "event_types": ["create_object"],
        "object_filters": ["*"],
        "cloudfunc": "image",
        "notify_url": notify_url,
        "cloudfunc_args": {"action": format!("watermark_image:u_{url},p_1|format:t_png"),
                           "save_bucket": "out"},
    }]})
}

/// A logo written or replaced through the object API is used from the next
/// invocation on: the watermark cache (60 s for a logo read, 2 s for a
/// failure) forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logo_written_through_the_api_shows_at_the_next_invocation() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::local(test_config(dir.path())).await;
    let rules = marked_rule("s3://marks/logo.png", &receiver.url);
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let logo = |rgb: [u8; 3]| {
        let mut png = Vec::new();
        image::RgbaImage::from_pixel(8, 8, image::Rgba([rgb[0], rgb[1], rgb[2], 255]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    };
    let photo = fixture("images/storm.jpg");
    // No logo yet: a lasting failure, remembered for a moment.
    put_photos(&host, "photos", "m", 0..1, &photo).await;
    let first = receiver.wait_for(1).await;
    assert_eq!(
        first[0]["error"]["code"], "watermark_unavailable",
        "{}",
        first[0]
    );
    for (n, rgb) in [(1, [255, 0, 0]), (2, [0, 0, 255])] {
        let put = host
            .put_object("marks", "logo.png", logo(rgb), "image/png")
            .await;
        assert_eq!(put.status(), 201);
        put_photos(&host, "photos", "m", n..n + 1, &photo).await;
        let results = receiver.wait_for(n + 1).await;
        assert_eq!(results[n]["status"], "ok", "{}", results[n]);
        let got = host.object_bytes("out", &format!("gen_m{n:02}.jpg")).await;
        let marked = image::load_from_memory(&got).unwrap().to_rgba8();
        assert_eq!(
            marked.get_pixel(0, 0).0,
            [rgb[0], rgb[1], rgb[2], 255],
            "logo {n}"
        );
    }
    host.stop().await;
}

/// A watermark host that fails (503) for a moment: the invocation runs
/// again later, as for a store that fails, and reports the run that
/// succeeded, not the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_host_that_fails_for_a_moment_costs_no_result() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut png = Vec::new();
    image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 255]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let gets = Arc::new(AtomicUsize::new(0));
    let counted = gets.clone();
    let app = axum::Router::new().route(
        "/logo.png",
        axum::routing::get(move || {
            let (counted, png) = (counted.clone(), png.clone());
            async move {
                // The first answer is the host's own failure.
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                } else {
                    Ok(png)
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mark_url = format!("http://{}/logo.png", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.sources.allow_hosts = vec!["127.0.0.1".into()];
    config.sources.allow_private = true;
    // Past the time a failed fetch is remembered.
    config.backend_retries = vec![imgfunc::cloudfunc::FAILURE_TTL + Duration::from_secs(1)];
    let host = TestHost::local(config).await;
    let rules = marked_rule(&mark_url, &receiver.url);
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let photo = fixture("images/storm.jpg");
    put_photos(&host, "photos", "m", 0..1, &photo).await;

    let bodies = receiver.wait_for(1).await;
    assert_eq!(bodies[0]["status"], "ok", "{}", bodies[0]);
    assert_eq!(
        gets.load(Ordering::SeqCst),
        2,
        "fetched again for the second run"
    );
    let got = host.object_bytes("out", "gen_m00.jpg").await;
    let marked = image::load_from_memory(&got).unwrap().to_rgba8();
    assert_eq!(
        marked.get_pixel(0, 0).0,
        [255, 0, 0, 255],
        "the mark at (0, 0)"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.bodies().len(), 1, "{:?}", receiver.bodies());
    host.stop().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_host_that_hangs_does_not_hold_up_other_rules() {
    use base64::Engine as _;
    let mark = GatedMark::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.sources.allow_hosts = vec!["127.0.0.1".into()];
    config.sources.allow_private = true;
    // Longer than any wait here: the fetch ends when the test opens the gate.
    config.sources.timeout = Duration::from_secs(120);
    let host = TestHost::local(config).await;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mark.url);
    let rule = |id: &str, action: String| {
        json!({"notifications": [{
            "id": id,
            "event_types": ["create_object"],
            "object_filters": ["*"],
            "cloudfunc": "image",
            "cloudfunc_args": {"action": action, "save_bucket": "out"},
        }]})
    };
    let marked = rule(
        "marked",
        format!("watermark_image:u_{url},p_1|format:t_png"),
    );
    assert_eq!(host.set_rules("marked", &marked).await.status(), 200);
    let plain = rule("plain", "resize:w_40|format:t_png".into());
    assert_eq!(host.set_rules("plain", &plain).await.status(), 200);

    // More watermark invocations than the host has image slots (4 per
    // image thread, 2 threads), all waiting for the one hanging fetch.
    let photo = fixture("images/storm.jpg");
    put_photos(&host, "marked", "m", 0..12, &photo).await;
    eventually("the watermark fetch to start", || async {
        (mark.gets() > 0).then_some(())
    })
    .await;
    // Another rule's images go through meanwhile.
    put_photos(&host, "plain", "p", 0..3, &photo).await;
    let keys = eventually("the plain rule's outputs", || async {
        let keys = host.list_keys("out").await;
        (keys.len() == 3).then_some(keys)
    })
    .await;
    assert_eq!(keys, ["gen_p00.jpg", "gen_p01.jpg", "gen_p02.jpg"]);

    // Once the host answers, every watermark invocation gets the one
    // fetch's bytes: the mark is drawn at (0, 0).
    mark.open();
    eventually("the watermarked outputs", || async {
        (host.list_keys("out").await.len() == 15).then_some(())
    })
    .await;
    assert_eq!(mark.gets(), 1, "one fetch served the whole burst");
    // Later events take the watermark from the cache.
    put_photos(&host, "marked", "m", 12..15, &photo).await;
    eventually("the later watermarked outputs", || async {
        (host.list_keys("out").await.len() == 18).then_some(())
    })
    .await;
    assert_eq!(mark.gets(), 1, "the cache served the later events");
    for i in 0..15 {
        let got = host
            .http
            .get(host.object_url("out", &format!("gen_m{i:02}.jpg")))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200);
        let img = image::load_from_memory(&got.bytes().await.unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(img.get_pixel(3, 3).0, [255, 0, 0]);
        assert_ne!(img.get_pixel(100, 100).0, [255, 0, 0]);
    }
    host.stop().await;
    mark.server.abort();
}

/// A TCP proxy to `upstream` (`http://HOST:PORT`) that drops every
/// connection until it is opened: an S3 server that is down. Its endpoint,
/// its switch, and the connections it dropped.
async fn closed_proxy(
    upstream: &str,
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.trim_start_matches("http://").to_string();
    let (open, dropped) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (is_open, drops) = (open.clone(), dropped.clone());
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if !is_open.load(Ordering::SeqCst) {
                drops.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (format!("http://{addr}"), open, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_the_store_failed_runs_again_once_the_store_is_back() {
    use std::sync::atomic::Ordering;
    let s3 = start_s3().await;
    s3.create_bucket("photos").await;
    let original = fixture("images/storm.jpg");
    s3.client()
        .put_object()
        .bucket("photos")
        .key("a.jpg")
        .body(ByteStream::from(original.clone()))
        .send()
        .await
        .unwrap();
    // The host reaches the server through a proxy that is down for 6 s.
    // Its first run fails within about 3 s (the S3 client's own three
    // attempts), and it runs again 10 s after that, once the proxy is up:
    // a result before 10 s would be the first run's.
    let (endpoint, open, dropped) = closed_proxy(&s3.endpoint).await;
    let store = imgfunc::store::S3Store::new(
        common::s3::s3_client(&endpoint, &s3.access_key, &s3.secret_key),
        endpoint.clone(),
    );
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.embedded = false;
    config.backend_retries = vec![Duration::from_secs(10)];
    let host = TestHost::start(config, std::sync::Arc::new(store)).await;
    let rules = image_rule("thumbs", "*.jpg", "resize:w_100", &receiver.url);
    assert_eq!(host.set_rules("photos", &rules).await.status(), 200);
    let event = minio_put_event("photos", "a.jpg", original.len(), "x");
    assert_eq!(host.post_events(&event).await.status(), 202);
    let posted = std::time::Instant::now();

    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        dropped.load(Ordering::SeqCst) > 0,
        "the store was not asked"
    );
    assert!(receiver.bodies().is_empty(), "{:?}", receiver.bodies());
    open.store(true, Ordering::SeqCst);

    // One result, the run that succeeded.
    let bodies = receiver.wait_for(1).await;
    assert!(
        posted.elapsed() >= Duration::from_secs(10),
        "not a second run"
    );
    assert_eq!(bodies[0]["status"], "ok", "{}", bodies[0]);
    assert_eq!(bodies[0]["outputs"][0]["key"], "gen_a.jpg", "{}", bodies[0]);
    // Its times are the second run's.
    assert!(
        bodies[0]["queue_ms"].as_f64().unwrap() < 4000.0,
        "{}",
        bodies[0]
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.bodies().len(), 1, "{:?}", receiver.bodies());
    host.stop().await;
}
