//! A fixed set of threads for image work.
//!
//! Each image allocates tens of megabytes; on long-lived threads the
//! allocator reuses those pages from image to image, where tokio's blocking
//! pool would hand work to whichever thread is free (and start new ones),
//! touching cold memory each time. The pool's size is also the limit on
//! image work running at once.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Task = Box<dyn FnOnce() + Send + 'static>;

/// Runs closures on `size` dedicated threads.
pub struct CpuPool {
    sender: Mutex<mpsc::Sender<Task>>,
}

impl CpuPool {
    pub fn new(size: usize) -> std::io::Result<CpuPool> {
        let (sender, receiver) = mpsc::channel::<Task>();
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..size.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("imgfunc-cpu-{n}"))
                .spawn(move || {
                    let mut faults = thread_faults();
                    loop {
                        let task = match receiver.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match task {
                            Ok(task) => {
                                task();
                                trim_after_growth(&mut faults);
                            }
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(CpuPool {
            sender: Mutex::new(sender),
        })
    }

    /// Runs `work` on the pool and waits for its result without blocking the
    /// async runtime. A panic in `work` is reported as an error.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task: Task = Box::new(move || {
            // The caller went away while this waited: nobody wants the result.
            if tx.is_closed() {
                return;
            }
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = tx.send(result);
        });
        self.sender
            .lock()
            .map_err(|_| "the image pool is gone".to_string())?
            .send(task)
            .map_err(|_| "the image pool is gone".to_string())?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err("image work panicked".to_string()),
            Err(_) => Err("image work was dropped".to_string()),
        }
    }
}

/// Minor page faults in one task past which the pool asks the allocator
/// how much free memory it keeps (`mallinfo2`, under a microsecond here):
/// a photo in the steady state costs a few, and with transparent huge
/// pages one fault maps 2 MiB (64 of them, 128 MiB), so the first gate is
/// low and the second is what decides.
const CHECK_AFTER_FAULTS: i64 = 64;

/// Free heap memory past which it goes back to the kernel after a task. The
/// heap keeps what images free (see `tune_allocator` in main.rs), so that
/// the next image reuses warm pages; a photo's tens of megabytes stay, but
/// an image that took far more (an animation's hundreds of megabytes of
/// frames) would otherwise leave the server that much larger for good.
const TRIM_OVER_FREE_BYTES: usize = 256 << 20;

/// After a task: when it faulted in more than [`CHECK_AFTER_FAULTS`] pages
/// since `faults` was counted (one `getrusage` call per task) and the heap
/// now keeps more than [`TRIM_OVER_FREE_BYTES`] free, hands that memory
/// back to the kernel.
fn trim_after_growth(faults: &mut i64) {
    let now = thread_faults();
    let grew = now - *faults > CHECK_AFTER_FAULTS;
    *faults = now;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads the allocator's statistics, and
    // malloc_trim only releases its own free memory; both may be called
    // from any thread at any time.
    unsafe {
        if grew && libc::mallinfo2().fordblks > TRIM_OVER_FREE_BYTES {
            libc::malloc_trim(0);
            *faults = thread_faults();
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = grew;
}

/// Minor page faults of the calling thread so far (0 where not counted).
fn thread_faults() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; on failure it is left
    // zeroed, which is a valid rusage.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_minflt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_work_and_reports_panics() {
        let pool = CpuPool::new(2).unwrap();
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
        let err = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(err.contains("panicked"));
        // The pool keeps working after a panic.
        assert_eq!(pool.run(|| 1).await, Ok(1));
    }

    #[tokio::test]
    async fn work_nobody_waits_for_is_skipped() {
        let pool = std::sync::Arc::new(CpuPool::new(1).unwrap());
        // Hold the one thread until told.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || held.recv().is_ok()).await }
        });
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiting = tokio::spawn({
            let (pool, ran) = (pool.clone(), ran.clone());
            async move {
                pool.run(move || ran.store(true, std::sync::atomic::Ordering::SeqCst))
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Its caller goes away while it waits (a client hung up).
        waiting.abort();
        let _ = waiting.await;
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Ok(true));
        assert_eq!(pool.run(|| 1).await, Ok(1));
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
