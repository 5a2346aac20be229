//! The dead-letter file: one JSON line per payload that was not delivered.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Appends records to the dead-letter file, one at a time.
#[derive(Debug)]
pub(super) struct DeadLetters {
    path: PathBuf,
    /// Serializes appends from this process; each record is also written
    /// with a single `write` on an `O_APPEND` file so that other processes
    /// appending to the same file do not split it either. Taken on the
    /// blocking pool, inside the task that writes (see [`DeadLetters::append`]).
    lock: Arc<Mutex<()>>,
}

impl DeadLetters {
    pub(super) fn new(path: PathBuf) -> DeadLetters {
        DeadLetters {
            path,
            lock: Arc::default(),
        }
    }

    /// The lock appends take, for a test to hold.
    #[cfg(test)]
    pub(super) fn lock(&self) -> Arc<Mutex<()>> {
        self.lock.clone()
    }

    /// Appends `{"time", "url", "attempts", "last_error", "payload"}`.
    pub(super) async fn append(
        &self,
        url: &str,
        attempts: u32,
        last_error: &str,
        payload: &Value,
    ) -> io::Result<()> {
        let record = json!({
            "time": rfc3339(SystemTime::now()),
            "url": url,
            "attempts": attempts,
            "last_error": last_error,
            "payload": payload,
        });
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        let (path, lock) = (self.path.clone(), self.lock.clone());
        // The write starts as this is first polled, in a task that waits
        // for the lock itself: a caller stopped meanwhile (a shutdown's
        // abort of a delivery that had just given up) no longer drops the
        // record, which is no longer among the deliveries under way either.
        tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            append_line(&path, &line)
        })
        .await
        .map_err(io::Error::other)?
    }
}

fn append_line(path: &std::path::Path, line: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let len = file.metadata()?.len();
    // A record cut short (a full disk, a crash mid-write) must not swallow
    // the next one: it starts on a line of its own.
    let mut last = [0u8; 1];
    let cut_short = len > 0 && {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut last, len - 1)?;
        last[0] != b'\n'
    };
    let mut record = Vec::with_capacity(line.len() + 1);
    if cut_short {
        record.push(b'\n');
    }
    record.extend_from_slice(line);
    if let Err(error) = file.write_all(&record) {
        // Take back what part of it went in, so the file keeps whole lines.
        let _ = file.set_len(len);
        return Err(error);
    }
    file.sync_data()
}

/// `2024-05-01T10:00:00.123Z`, without a date-time dependency.
pub(super) fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for dates on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_record_cut_short_does_not_swallow_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead-letter.jsonl");
        let letters = DeadLetters::new(path.clone());
        letters
            .append("http://a/", 1, "first", &json!({"n": 1}))
            .await
            .unwrap();
        // What a write stopped by a full disk or a crash leaves behind.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"time":"2024-"#).unwrap();
        letters
            .append("http://b/", 2, "second", &json!({"n": 2}))
            .await
            .unwrap();
        letters
            .append("http://c/", 3, "third", &json!({"n": 3}))
            .await
            .unwrap();

        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], r#"{"time":"2024-"#);
        for (line, n) in [(lines[0], 1), (lines[2], 2), (lines[3], 3)] {
            let record: Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["payload"]["n"], n);
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_714_557_600_123);
        assert_eq!(rfc3339(t), "2024-05-01T10:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        let end = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(rfc3339(end), "2024-12-31T23:59:59.000Z");
    }
}
