//! The `imgfunc` command: `process` runs one pipeline on a file; `serve` runs
//! the function host.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use imgfunc::action::Action;
use imgfunc::imaging::{self, Limits, WatermarkResolver};

#[derive(Parser)]
#[command(
    name = "imgfunc",
    version,
    about = "Image functions for object storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an action pipeline on one image file (`-` for stdin/stdout).
    Process(ProcessArgs),
    /// Run the function host: events in, processed objects out.
    Serve(ServeArgs),
    /// Time decode-pipeline-encode in process, in the peers' output format.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The action to time; omit with --decode-only.
    #[arg(long, short, default_value = "")]
    action: String,
    /// Time only decoding to raw pixels (the floor every pipeline pays).
    #[arg(long)]
    decode_only: bool,
    /// Label printed in the PIPELINE column.
    #[arg(long, default_value = "custom")]
    pipeline: String,
    /// Timed runs per file, after one warm-up.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Images processed at once: this many long-lived threads each run
    /// every iteration together (a barrier starts each round); the times
    /// printed are per image, over all threads' runs.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    files: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "IMGFUNC_LISTEN", default_value = "127.0.0.1:8080",
          value_parser = socket_address)]
    listen: std::net::SocketAddr,
    /// The embedded local store (bucket = folder); also holds rules set
    /// through the API and the dead-letter file.
    #[arg(long, env = "IMGFUNC_DATA", default_value = "./data")]
    data: PathBuf,
    /// Where the local store keeps objects' metadata: `xattr` (an extended
    /// attribute of each file; sidecar files where the filesystem refuses
    /// one) or `sidecar` (always files under `.imgfunc-meta`, for folders
    /// copied by tools that drop extended attributes).
    #[arg(long, env = "IMGFUNC_LOCAL_METADATA", default_value = "xattr",
          value_parser = ["xattr", "sidecar"])]
    local_metadata: String,
    /// Never ask the kernel (`cachestat`) whether a local source is in
    /// memory, and read every source on the blocking pool instead of the
    /// image thread: for sandboxes whose system call filter kills a
    /// process for a call it does not list.
    #[arg(long, env = "IMGFUNC_NO_PAGE_CACHE_CHECK")]
    no_page_cache_check: bool,
    /// Rule files (`*.json`) loaded at start.
    #[arg(long, env = "IMGFUNC_FUNCTIONS", default_value = "./functions")]
    functions: PathBuf,
    /// Use this S3 endpoint instead of the local store (region and
    /// credentials from the usual AWS_* variables).
    #[arg(long, env = "IMGFUNC_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Virtual-hosted-style S3 addressing instead of path style.
    #[arg(long, env = "IMGFUNC_S3_VIRTUAL_HOSTS")]
    s3_virtual_hosts: bool,
    /// Image threads: images processed at once (default: the number of
    /// cores).
    #[arg(long, env = "IMGFUNC_WORKERS", value_parser = workers)]
    workers: Option<usize>,
    /// Invocations that may wait before events are answered 503.
    #[arg(long, env = "IMGFUNC_QUEUE", default_value_t = 1024,
          value_parser = queue_bound)]
    queue: usize,
    /// Client connections open at once; more wait to be accepted. The
    /// process's open-file limit is raised to its hard limit at start.
    #[arg(long, env = "IMGFUNC_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = at_least_one)]
    max_connections: usize,
    /// Delivery attempts per notification (at most 100).
    #[arg(long, env = "IMGFUNC_NOTIFY_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    notify_attempts: u32,
    /// Hosts `watermark_image` may fetch from over http(s), comma-separated.
    #[arg(long, env = "IMGFUNC_WATERMARK_HOSTS", value_delimiter = ',')]
    watermark_hosts: Vec<String>,
    /// Let watermark fetches reach loopback, private and link-local addresses.
    #[arg(long, env = "IMGFUNC_WATERMARK_ALLOW_PRIVATE")]
    watermark_allow_private: bool,
    /// Seconds a fetched watermark image is used before it is fetched
    /// again; 0 fetches it for every invocation.
    #[arg(long, env = "IMGFUNC_WATERMARK_CACHE_SECS", default_value_t = 60)]
    watermark_cache_secs: u64,
    /// Seconds caches may keep a `?image` answer without asking again
    /// (`Cache-Control: public, max-age=`); 0 sends `no-cache`.
    #[arg(long, env = "IMGFUNC_IMAGE_MAX_AGE", default_value_t = 0)]
    image_max_age: u64,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(clap::Args)]
struct LimitArgs {
    /// Largest input in bytes.
    #[arg(long, env = "IMGFUNC_MAX_INPUT_BYTES", default_value_t = 50 * 1024 * 1024,
          value_parser = at_least_one)]
    max_input_bytes: usize,
    /// Largest input in pixels, checked from the header before decoding.
    #[arg(long, env = "IMGFUNC_MAX_PIXELS", default_value_t = 100_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// Largest output width or height.
    #[arg(long, env = "IMGFUNC_MAX_OUTPUT_SIDE", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_output_side: u32,
}

/// An address as `IP:PORT`: a host name is refused with an example, not
/// with the parser's bare "invalid socket address syntax".
fn socket_address(value: &str) -> Result<std::net::SocketAddr, String> {
    value.parse().map_err(|_| {
        format!(
            "`{value}` is not an IP address and port: use 127.0.0.1:8080, 0.0.0.0:8080 or \
             [::1]:8080 (host names are not looked up)"
        )
    })
}

/// Image threads, each with its own stack and invocations in flight: at
/// most 1024 (a number far past any machine's cores, which the process
/// could not start).
fn workers(value: &str) -> Result<usize, String> {
    match at_least_one(value)? {
        n if n > 1024 => Err(format!("{n} image threads are too many; at most 1024")),
        n => Ok(n),
    }
}

/// The most invocations the queue may hold: each waiting one is a few
/// hundred bytes in memory and a line in the journal.
const MAX_QUEUE: usize = 1 << 20;

fn queue_bound(value: &str) -> Result<usize, String> {
    match at_least_one(value)? {
        n if n > MAX_QUEUE => Err(format!("must be at most {MAX_QUEUE}")),
        n => Ok(n),
    }
}

/// A count or size that 0 would make useless (every image refused, a queue
/// that holds nothing): refused at start instead.
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_input_bytes: self.max_input_bytes,
            max_pixels: self.max_pixels,
            max_output_side: self.max_output_side,
            ..Limits::default()
        }
    }
}

#[derive(clap::Args)]
struct ProcessArgs {
    /// The action, e.g. `resize:w_300|format:t_webp`.
    #[arg(long, short)]
    action: String,
    /// Input image file, or `-` for stdin.
    input: PathBuf,
    /// Output file, or `-` for stdout.
    #[arg(short, long, default_value = "-")]
    output: PathBuf,
    /// A local store directory (bucket = folder) for `watermark_image` URLs
    /// such as `s3://bucket/key`; other URLs are read as local file paths.
    #[arg(long, env = "IMGFUNC_DATA")]
    store: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Resolves watermark URLs to local files or to objects of a store directory.
struct LocalResolver {
    store: Option<PathBuf>,
}

impl WatermarkResolver for LocalResolver {
    fn resolve(&self, url: &str) -> std::result::Result<Vec<u8>, String> {
        let path = if url.starts_with("s3://") {
            let store = self
                .store
                .as_ref()
                .ok_or("s3:// URLs need --store DIR".to_string())?;
            // Named as `serve` names it (the key percent-decoded), and held
            // to the local store's rules, so that it stays inside DIR.
            let (bucket, key) = imgfunc::cloudfunc::s3_url_object(url)?;
            imgfunc::store::validate_bucket(&bucket)
                .and_then(|()| imgfunc::store::validate_local_key(&key))
                .map_err(|e| format!("{url}: {e}"))?;
            store.join(bucket).join(key)
        } else if let Some(rest) = url.strip_prefix("file://") {
            // `file://localhost/a` is `file:///a`.
            PathBuf::from(
                rest.strip_prefix("localhost")
                    .filter(|path| path.starts_with('/'))
                    .unwrap_or(rest),
            )
        } else if url.contains("://") {
            return Err(format!(
                "{url}: only local files and s3://bucket/key are read here"
            ));
        } else {
            PathBuf::from(url)
        };
        // Held to serve's watermark cap, read with a bound, and only from a
        // plain file: a path may name something endless (a device) or a
        // pipe nobody writes to, whose open would wait for ever (so the
        // open does not wait).
        let limit = imgfunc::cloudfunc::MAX_WATERMARK_BYTES;
        let mut bytes = Vec::new();
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
        }
        .and_then(|file| {
            if !file.metadata()?.is_file() {
                return Err(std::io::Error::other(
                    "not a plain file (a device, a pipe or a folder)",
                ));
            }
            file.take((limit as u64).saturating_add(1))
                .read_to_end(&mut bytes)
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.len() > limit {
            return Err(format!(
                "{}: larger than the {limit}-byte watermark cap",
                path.display()
            ));
        }
        Ok(bytes)
    }
}

/// The input of `process`, through [`imaging::read_source`]: a thumbnail of
/// a large progressive JPEG reads only its DC scans, as `serve` does.
fn read_source(path: &PathBuf, action: &Action, limits: &imaging::Limits) -> Result<Vec<u8>> {
    let limit = limits.max_input_bytes;
    if path.as_os_str() == "-" {
        // Its size is known once it is read: held to the limit like a file.
        let mut input = Vec::new();
        std::io::stdin()
            .lock()
            .take((limit as u64).saturating_add(1))
            .read_to_end(&mut input)
            .context("reading stdin")?;
        if input.len() > limit {
            bail!("stdin is over the limit of {limit} bytes");
        }
        let len = input.len() as u64;
        return imaging::read_source(&mut input.as_slice(), len, action, limits)
            .context("reading stdin");
    }
    let cannot = || format!("cannot read {}", path.display());
    let mut file = std::fs::File::open(path).with_context(cannot)?;
    let len = file.metadata().with_context(cannot)?.len();
    if len > limit as u64 {
        bail!(
            "{} is {len} bytes, over the limit of {limit} bytes",
            path.display()
        );
    }
    imaging::read_source(&mut file, len, action, limits).with_context(cannot)
}

fn process(args: ProcessArgs) -> Result<()> {
    let action = Action::parse(&args.action).context("bad --action")?;
    let limits = args.limits.limits();
    // `save:` writes DIR/<bucket>/<key>: held to the store's names, checked
    // before any work, so that no save reaches outside DIR.
    imgfunc::rules::check_save_targets(&action)
        .map_err(|e| anyhow::anyhow!("bad --action: save: {e}"))?;
    let saves = action
        .ops
        .iter()
        .any(|op| matches!(op, imgfunc::action::Op::Save(_)));
    if saves && args.store.is_none() {
        bail!("bad --action: save needs --store DIR to write to");
    }
    // As in `serve`, the output never replaces its source: checked before
    // any work, by file identity (the same file under another path too).
    // `-` is stdin or stdout, not a file of that name.
    let file = |path: &std::path::Path| {
        (path.as_os_str() != "-")
            .then(|| std::fs::metadata(path).ok())
            .flatten()
    };
    if let (Some(input), Some(output)) = (file(&args.input), file(&args.output)) {
        use std::os::unix::fs::MetadataExt;
        if (output.dev(), output.ino()) == (input.dev(), input.ino()) {
            bail!(
                "-o {} is the input file; process never overwrites its input",
                args.output.display()
            );
        }
    }
    if let (Some(store), Ok(input)) = (&args.store, std::fs::metadata(&args.input)) {
        use std::os::unix::fs::MetadataExt;
        for op in &action.ops {
            let imgfunc::action::Op::Save(save) = op else {
                continue;
            };
            let target = store.join(&save.bucket).join(&save.key);
            if std::fs::metadata(&target)
                .is_ok_and(|t| (t.dev(), t.ino()) == (input.dev(), input.ino()))
            {
                bail!(
                    "bad --action: save:b_{},k_{} is the input file {}; process never \
                     overwrites its input",
                    save.bucket,
                    save.key,
                    args.input.display()
                );
            }
        }
    }
    let input = read_source(&args.input, &action, &limits)?;
    let resolver = LocalResolver { store: args.store };
    let out = imaging::process(&input, &action, &limits, &resolver)?;
    for save in &out.saves {
        let store = resolver
            .store
            .as_ref()
            .context("save: needs --store DIR to write to")?;
        let path = store.join(&save.bucket).join(&save.key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("save: cannot create folder {}", dir.display()))?;
        }
        write_whole(&path, &save.image.bytes)?;
    }
    let bytes = match (&out.image, &out.info) {
        (Some(img), _) => img.bytes.clone(),
        (None, Some(info)) => {
            let mut v = serde_json::to_vec_pretty(info)?;
            v.push(b'\n');
            v
        }
        (None, None) => Vec::new(),
    };
    if args.output.as_os_str() == "-" {
        std::io::stdout().write_all(&bytes)?;
    } else {
        write_whole(&args.output, &bytes)?;
    }
    Ok(())
}

/// Writes `bytes` to a hidden file beside `path` and renames it over
/// `path`, so that a failed write (a full disk) leaves no partial file
/// under the name, and an older file there stays whole (its permissions
/// carry over). Anything but a plain file at `path` (a link, `/dev/null`,
/// a pipe) is written through in place.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let context = || format!("cannot write {}", path.display());
    let old = std::fs::symlink_metadata(path).ok();
    if old.as_ref().is_some_and(|m| !m.is_file()) {
        return std::fs::write(path, bytes).with_context(context);
    }
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".imgfunc-tmp-{}-{n}", std::process::id()));
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| match &old {
            Some(old) => std::fs::set_permissions(&tmp, old.permissions()),
            None => Ok(()),
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(context);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    use imgfunc::host::{Host, HostConfig, shutdown_signal};
    use imgfunc::store::{LocalStore, MetadataPlace, ObjectStore, S3Store};
    use std::sync::Arc;

    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env();
    let log_filter_error = log_filter.as_ref().err().map(ToString::to_string);
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(log_filter.unwrap_or_else(|_| "info,tower_http=warn".into()))
        .init();
    if let (Some(e), Ok(value)) = (log_filter_error, std::env::var("RUST_LOG")) {
        tracing::warn!("RUST_LOG={value:?} is not a log filter ({e}); logging at info");
    }
    if args.no_page_cache_check {
        imgfunc::store::set_page_cache_check(false);
    }
    let mut config = HostConfig::new(args.data.clone());
    config.listen = args.listen;
    if args.functions.exists() && !args.functions.is_dir() {
        anyhow::bail!(
            "--functions {}: not a folder (rule files go in a folder of *.json)",
            args.functions.display()
        );
    }
    config.functions_dir = args.functions.is_dir().then_some(args.functions.clone());
    if let Some(w) = args.workers {
        config.workers = w;
    }
    config.queue_bound = args.queue;
    config.max_connections = connection_cap(args.max_connections);
    config.notify.attempts = args.notify_attempts.max(1);
    config.limits = args.limits.limits();
    config.sources.allow_hosts = args
        .watermark_hosts
        .iter()
        .filter(|h| !h.trim().is_empty())
        .map(|h| imgfunc::cloudfunc::allow_list_entry(h).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    config.sources.allow_private = args.watermark_allow_private;
    config.sources.cache_ttl = std::time::Duration::from_secs(args.watermark_cache_secs);
    config.image_max_age = std::time::Duration::from_secs(args.image_max_age);
    config.sources.self_urls = vec![format!("http://{}", args.listen)];
    let store: Arc<dyn ObjectStore> = match &args.s3_endpoint {
        Some(endpoint) => {
            config.embedded = false;
            config.sources.s3_endpoint = Some(endpoint.clone());
            Arc::new(S3Store::from_env(endpoint, !args.s3_virtual_hosts).await?)
        }
        None => {
            let place = if args.local_metadata == "sidecar" {
                MetadataPlace::Sidecar
            } else {
                MetadataPlace::Xattr
            };
            let store = LocalStore::with_metadata(args.data.clone(), place);
            store
                .create_root()
                .await
                .with_context(|| format!("cannot create {}", args.data.display()))?;
            Arc::new(store)
        }
    };
    let host = Host::bind(config, store).await?;
    let keep_journal = host.journal_keeper();
    host.run(async {
        shutdown_signal().await;
        // A second signal while the work drains stops the process at once:
        // what did not finish stays in the journal.
        tokio::spawn(async move {
            shutdown_signal().await;
            keep_journal();
            tracing::warn!(
                "a second signal: stopping now; unfinished invocations stay in the journal \
                 and run at the next start"
            );
            std::process::exit(130);
        });
    })
    .await
}

/// Prints `imgfunc PIPELINE FILE median_ms min_ms out_bytes` per file.
fn bench(args: BenchArgs) -> Result<()> {
    use std::time::Instant;
    let action = if args.decode_only {
        None
    } else {
        Some(Action::parse(&args.action).context("bad --action")?)
    };
    let limits = Limits::default();
    let once = |input: &[u8]| -> Result<usize> {
        Ok(match &action {
            Some(action) => {
                let out = imaging::process(input, action, &limits, &imaging::NoWatermarks)?;
                out.image.map_or(0, |i| i.bytes.len())
            }
            None => {
                let d = imaging::decode(input, &limits, imaging::Lead::Nothing)?;
                let (w, h) = d.pixels.dimensions();
                (w * h * 3) as usize
            }
        })
    };
    for file in &args.files {
        let input =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let bytes = once(&input)?;
        let iterations = args.iterations.max(1);
        let threads = args.threads.max(1);
        let barrier = std::sync::Barrier::new(threads);
        let run_thread = || -> Result<Vec<f64>> {
            // Each thread warms its own allocator arena first.
            once(&input)?;
            let mut times = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                barrier.wait();
                let start = Instant::now();
                once(&input)?;
                times.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(times)
        };
        let mut times = std::thread::scope(|s| -> Result<Vec<f64>> {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(run_thread)).collect();
            let mut all = Vec::with_capacity(threads * iterations);
            for h in handles {
                all.extend(
                    h.join()
                        .map_err(|_| anyhow::anyhow!("bench thread panicked"))??,
                );
            }
            Ok(all)
        })?;
        times.sort_by(f64::total_cmp);
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        println!(
            "imgfunc {} {} {:.1} {:.1} {}",
            args.pipeline,
            name,
            times[times.len() / 2],
            times[0],
            bytes
        );
    }
    Ok(())
}

/// Raises the open-file limit to its hard limit (often 1024 soft against
/// a million hard) and returns how many connections fit under it with
/// room for the store's own files: `wanted`, or fewer with a warning.
fn connection_cap(wanted: usize) -> usize {
    /// Files kept for the store, rule files, the dead-letter file and the
    /// process itself.
    const RESERVE: u64 = 256;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return wanted;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let fits = usize::try_from(soft.saturating_sub(RESERVE).max(16)).unwrap_or(usize::MAX);
    if fits < wanted {
        tracing::warn!(
            open_files = soft,
            connections = fits,
            "the open-file limit leaves room for fewer connections than --max-connections"
        );
    }
    wanted.min(fits)
}

/// Keeps large buffers (decoded images, libjpeg-turbo's coefficient arrays)
/// in the heap after they are freed. By default glibc maps allocations over
/// its adaptive threshold afresh each time and returns them on free, so
/// every image pays for page faults on tens of megabytes; reusing the heap
/// made a full decode of an 8-megapixel progressive JPEG 12 % faster.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called once
    // at start, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Takes an `IMGFUNC_*` variable set to nothing (`IMGFUNC_WORKERS=` in an
/// env file) as unset, as shells and most programs do, rather than as a
/// value the setting cannot parse.
fn drop_empty_settings() {
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(name, value)| name.to_string_lossy().starts_with("IMGFUNC_") && value.is_empty())
        .map(|(name, _)| name)
        .collect();
    for name in empty {
        // SAFETY: called first in `main`, before any other thread exists
        // to read the environment.
        unsafe { std::env::remove_var(name) };
    }
}

/// Exits on a command-line error as clap does, adding which `IMGFUNC_*`
/// variable a refused value came from when it was not on the command line
/// (clap names only the flag, which an operator who set the variable in an
/// environment file never typed).
fn exit_naming_the_variable(error: clap::Error) -> ! {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let flag = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.split([' ', '=']).next().map(str::to_string),
        _ => None,
    };
    let typed = |long: &str| {
        let (flag, with_value) = (format!("--{long}"), format!("--{long}="));
        std::env::args_os().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&with_value)
        })
    };
    let command = Cli::command();
    let variable = flag.and_then(|flag| {
        command
            .get_subcommands()
            .flat_map(|sub| sub.get_arguments())
            .find(|arg| {
                arg.get_long()
                    .is_some_and(|long| flag == format!("--{long}"))
            })
            .filter(|arg| arg.get_long().is_some_and(|long| !typed(long)))
            .and_then(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
    });
    match variable {
        Some(name) if std::env::var_os(&name).is_some() => {
            let text = error.render().to_string();
            let note = format!("  (the value comes from the environment variable {name})");
            match text.split_once("\n\n") {
                Some((head, rest)) => eprint!("{head}\n{note}\n\n{rest}"),
                None => eprintln!("{}\n{note}", text.trim_end()),
            }
            std::process::exit(error.exit_code());
        }
        _ => error.exit(),
    }
}

fn main() -> ExitCode {
    drop_empty_settings();
    tune_allocator();
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_naming_the_variable(e));
    let result = match cli.command {
        Command::Process(args) => process(args),
        Command::Bench(args) => bench(args),
        Command::Serve(args) => tokio::runtime::Runtime::new()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(serve(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: errors that name their cause in their own
            // message are not followed by it again.
            let mut message = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if message.ends_with(&cause) {
                    continue;
                }
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&cause);
            }
            eprintln!("imgfunc: {message}");
            ExitCode::FAILURE
        }
    }
}
