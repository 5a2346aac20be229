//! The `imgfunc process` command line, run as a user runs it: the real
//! binary, real files, its exit status and messages.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/images")
        .join(name)
}

/// Runs `imgfunc ARGS`, feeding `stdin` when given.
fn imgfunc(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgfunc"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imgfunc");
    if let Some(bytes) = stdin {
        // The process may stop reading early (a refused input): a broken
        // pipe here is its answer, not the test's failure.
        let _ = child.stdin.take().unwrap().write_all(bytes);
    }
    child.wait_with_output().expect("imgfunc output")
}

/// `imgfunc process -a ACTION INPUT -o OUTPUT --store STORE`.
fn process_into(store: &Path, action: &str, input: &Path, output: &Path) -> Output {
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let args = [
        "process",
        "-a",
        action,
        &path(input),
        "-o",
        &path(output),
        "--store",
        &path(store),
    ];
    imgfunc(&args, None)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn saves_stay_inside_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let input = fixture("storm.jpg");
    for save in [
        "save:b_..,k_escaped.jpg",
        "save:b_out,k_../escaped.jpg",
        "save:b_out,k_/tmp/escaped.jpg",
    ] {
        let out = process_into(
            &store,
            &format!("resize:w_50|{save}"),
            &input,
            &dir.path().join("out.jpg"),
        );
        assert!(!out.status.success(), "{save} was accepted");
        let err = stderr(&out);
        assert!(err.contains("save:"), "{save}: {err}");
        assert!(
            !dir.path().join("escaped.jpg").exists(),
            "{save} wrote outside the store"
        );
        assert!(
            !dir.path().join("out.jpg").exists(),
            "{save}: nothing is written"
        );
    }
    assert!(!Path::new("/tmp/escaped.jpg").exists());

    // A plain save lands in DIR/<bucket>/<key>.
    let action = "resize:w_50|save:b_out,k_small/s.jpg";
    let out = process_into(&store, action, &input, &dir.path().join("out.jpg"));
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = image::open(store.join("out/small/s.jpg")).unwrap();
    assert_eq!(saved.width(), 50);
    // Written whole under their names, with no temporary files left.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["out.jpg", "store"]);
    assert_eq!(image::open(dir.path().join("out.jpg")).unwrap().width(), 50);
    // An output that is a link is written through, not replaced.
    std::os::unix::fs::symlink("out.jpg", dir.path().join("link.jpg")).unwrap();
    let action = "resize:w_30";
    let out = process_into(&store, action, &input, &dir.path().join("link.jpg"));
    assert!(out.status.success(), "{}", stderr(&out));
    let link = std::fs::symlink_metadata(dir.path().join("link.jpg")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(image::open(dir.path().join("out.jpg")).unwrap().width(), 30);
    std::fs::remove_file(dir.path().join("link.jpg")).unwrap();
    let action = "resize:w_50|save:b_out,k_small/s.jpg";

    // Without --store, a save is refused before any work, and nothing is
    // written.
    let output = dir.path().join("none.jpg");
    let out = imgfunc(
        &[
            "process",
            "-a",
            action,
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("save needs --store DIR"),
        "{}",
        stderr(&out)
    );
    assert!(!output.exists());

    // A save or an output that names the input file is refused before any
    // work, and the input stays as it was.
    let source = store.join("out/small/s.jpg");
    let before = std::fs::read(&source).unwrap();
    let again = dir.path().join("again.jpg");
    for (action, output) in [
        ("resize:w_20|save:b_out,k_small/s.jpg", &again),
        ("resize:w_20", &source),
    ] {
        let out = process_into(&store, action, &source, output);
        assert_eq!(out.status.code(), Some(1), "{action}");
        assert!(
            stderr(&out).contains("is the input file"),
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::read(&source).unwrap(), before, "{action}");
    }
    assert!(!again.exists());
}

#[test]
fn watermark_urls_name_store_objects_as_serve_does() {
    // `s3://marks/logo%20x.png` is the object `logo x.png`, as `serve`
    // reads it; a key the store refuses is refused here too.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(store.join("marks")).unwrap();
    let mut png = Vec::new();
    image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 255]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(store.join("marks/logo x.png"), &png).unwrap();
    let mark = |url: &str| {
        use base64::Engine;
        let u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url);
        format!("resize:w_50|watermark_image:u_{u},p_1|format:t_png")
    };
    let output = dir.path().join("out.png");
    let out = process_into(
        &store,
        &mark("s3://marks/logo%20x.png"),
        &fixture("storm.jpg"),
        &output,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let marked = image::open(&output).unwrap().to_rgb8();
    assert_eq!(marked.width(), 50);
    // Drawn whole at the top-left corner.
    assert_eq!(marked.get_pixel(3, 3).0, [255, 0, 0]);

    let out = process_into(
        &store,
        &mark("s3://marks/a%2F..%2F..%2Fescape.png"),
        &fixture("storm.jpg"),
        &output,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("s3://marks/a%2F..%2F..%2Fescape.png"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_watermark_path_is_read_to_the_watermark_cap_only_and_from_a_plain_file() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.png");
    // A file over serve's 10 MiB cap stops there, at once.
    let big = dir.path().join("big.png");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(11 << 20)
        .unwrap();
    // A device never ends; a pipe nobody writes to would hold the open for
    // ever: both are refused as what they are.
    let fifo = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string naming a path in a temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for (path, expected) in [
        (
            big.to_str().unwrap(),
            "larger than the 10485760-byte watermark cap",
        ),
        ("/dev/zero", "not a plain file"),
        (fifo.to_str().unwrap(), "not a plain file"),
    ] {
        let u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(path);
        let mut child = Command::new(env!("CARGO_BIN_EXE_imgfunc"))
            .args(["process", "-a"])
            .arg(format!("resize:w_50|watermark_image:u_{u}|format:t_png"))
            .arg(fixture("storm.jpg"))
            .arg("-o")
            .arg(&output)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("{path}: still running after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{path}");
        assert!(
            stderr(&out).contains(&format!("{path}: {expected}")),
            "{path}: {}",
            stderr(&out)
        );
        assert!(!output.exists());
    }
}

#[test]
fn stdin_is_held_to_the_input_limit_like_a_file() {
    // A thumbnail of a progressive JPEG reads only its DC scans; from
    // stdin, it still may not be larger than --max-input-bytes.
    let input = std::fs::read(fixture("wood-progressive-1280.jpg")).unwrap();
    let limit = (input.len() / 2).to_string();
    let args = [
        "process",
        "-a",
        "resize:w_100",
        "-",
        "--max-input-bytes",
        &limit,
    ];
    let out = imgfunc(&args, Some(&input));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("stdin") && err.contains(&limit), "{err}");

    let path = fixture("wood-progressive-1280.jpg");
    let file_args = [
        "process",
        "-a",
        "resize:w_100",
        path.to_str().unwrap(),
        "--max-input-bytes",
        &limit,
    ];
    let out = imgfunc(&file_args, None);
    assert!(
        !out.status.success(),
        "a file over the limit is refused too"
    );

    // Within the limit, stdin works and gives the thumbnail.
    let out = imgfunc(&["process", "-a", "resize:w_100", "-"], Some(&input));
    assert!(out.status.success(), "{}", stderr(&out));
    let thumb = image::load_from_memory(&out.stdout).unwrap();
    assert_eq!(thumb.width(), 100);
}

#[test]
fn serve_says_once_why_it_cannot_make_its_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let data = file.join("data");
    let data = data.to_str().expect("a UTF-8 path");
    let out = imgfunc(&["serve", "--data", data, "--listen", "127.0.0.1:0"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot create {data}")), "{err}");
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");

    // The same for the rules' folder under a data folder that exists.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(".imgfunc"), b"").unwrap();
    let data = data.to_str().expect("a UTF-8 path");
    let out = imgfunc(&["serve", "--data", data, "--listen", "127.0.0.1:0"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches(".imgfunc is a file").count(), 1, "{err}");
}

/// `imgfunc serve` on `data`, on any free port, with `extra` arguments: for
/// settings that stop it at start.
fn serve_once(data: &str, extra: &[&str]) -> Output {
    let mut args = vec!["serve", "--data", data, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    imgfunc(&args, None)
}

#[test]
fn serve_refuses_settings_that_would_make_it_useless() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().expect("a UTF-8 path");
    for (flag, value) in [
        ("--queue", "0"),
        ("--workers", "0"),
        ("--max-connections", "0"),
        ("--max-input-bytes", "0"),
        ("--max-pixels", "0"),
        ("--max-output-side", "0"),
    ] {
        let out = serve_once(data, &[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = stderr(&out);
        assert!(err.contains(flag), "{flag}: {err}");
    }
    // Past what a process can start, and a host name for an address:
    // each refused saying what is wanted (the threads were an abort).
    for (flag, value, says) in [
        ("--workers", "20000", "at most 1024"),
        ("--queue", "2305843009213693952", "at most 1048576"),
        ("--notify-attempts", "4000000000", "100"),
        ("--listen", "localhost:8080", "127.0.0.1:8080"),
    ] {
        let out = imgfunc(&["serve", "--data", data, flag, value], None);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = stderr(&out);
        assert!(err.contains(flag) && err.contains(says), "{flag}: {err}");
    }
    // A rule file where the folder of rule files should be.
    let file = dir.path().join("rules.json");
    std::fs::write(&file, b"{}").unwrap();
    let functions = file.to_str().expect("a UTF-8 path");
    let out = serve_once(data, &["--functions", functions]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a folder"), "{}", stderr(&out));
    // A setting's variable set to nothing is unset, as in a shell: the
    // settings are taken, and the start goes on to the same stop.
    let out = Command::new(env!("CARGO_BIN_EXE_imgfunc"))
        .args(["serve", "--data", data, "--functions", functions])
        .env("IMGFUNC_WORKERS", "")
        .env("IMGFUNC_NO_PAGE_CACHE_CHECK", "")
        .env("IMGFUNC_MAX_PIXELS", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a folder"), "{}", stderr(&out));
    // A bad value from a variable names the variable too, not only the
    // flag it stands for; one typed on the command line does not.
    for (variable, value, flag) in [
        ("IMGFUNC_WORKERS", "abc", "--workers"),
        ("IMGFUNC_S3_VIRTUAL_HOSTS", "1", "--s3-virtual-hosts"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_imgfunc"))
            .args(["serve", "--data", data])
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{variable}");
        let err = stderr(&out);
        assert!(
            err.contains(flag) && err.contains(&format!("environment variable {variable}")),
            "{variable}: {err}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_imgfunc"))
        .args(["serve", "--data", data, "--workers", "abc"])
        .env("IMGFUNC_WORKERS", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !stderr(&out).contains("environment variable"),
        "{}",
        stderr(&out)
    );
    // An address in use is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = imgfunc(&["serve", "--data", data, "--listen", &addr], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("cannot listen on {addr}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_second_server_on_the_same_data_folder_stops_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (data, functions) = (dir.path().join("data"), dir.path().join("functions"));
    let _first = common::Served::spawn(&mut common::serve_command(&data, &functions, &[]))
        .expect("start the first server");
    let data = data.to_str().expect("a UTF-8 path");
    let out = imgfunc(&["serve", "--data", data, "--listen", "127.0.0.1:0"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("another process serves from this data folder"),
        "{err}"
    );
}
