//! `imgfunc serve` run as the real binary, its memory read from the kernel:
//! an animation that takes hundreds of megabytes to composite is handed
//! back once it is done, and one past the frame-pixel cap is refused.

#![cfg(target_os = "linux")]

use crate::common;

use std::time::Duration;

use common::Served;

/// `imgfunc serve` on a folder of its own, with one image thread.
fn start(dir: &std::path::Path) -> Served {
    let functions = dir.join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    let mut command = common::serve_command(&dir.join("data"), &functions, &["--workers", "1"]);
    Served::spawn(&mut command).expect("start imgfunc serve")
}

/// The server's resident and peak resident memory, in bytes.
fn resident(server: &Served) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// [`resident`] once under 100 MiB, or after 5 s.
async fn settled(server: &Served) -> (u64, u64) {
    let mut memory = resident(server);
    for _ in 0..50 {
        if memory.0 < 100 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        memory = resident(server);
    }
    memory
}

/// PUTs `body` as `photos/{name}` (answered 201), then asks for it
/// through `?image&action={action}`.
async fn put_then_process(
    client: &reqwest::Client,
    server: &Served,
    name: &str,
    content_type: &str,
    body: Vec<u8>,
    action: &str,
) -> reqwest::Response {
    let put = client
        .put(format!("{}/photos/{name}", server.base))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{name}");
    client
        .get(format!(
            "{}/photos/{name}?image&action={action}",
            server.base
        ))
        .send()
        .await
        .unwrap()
}

/// An animated GIF of `frames` one-pixel frames on a `side` x `side`
/// screen: a few bytes a frame, each composited onto a whole screen.
fn gif_of_dots(side: u16, frames: usize) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend(side.to_le_bytes());
    gif.extend(side.to_le_bytes());
    // A global colour table of two entries: black and white.
    gif.extend([0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
    for i in 0..frames {
        // A graphic control extension: 1/100 s, then the image descriptor.
        gif.extend([0x21, 0xf9, 4, 0, 1, 0, 0, 0, 0x2c]);
        gif.extend((i as u16 % side).to_le_bytes());
        gif.extend([0, 0, 1, 0, 1, 0, 0]);
        // LZW with 2-bit codes: clear (4), the pixel (1), end (5).
        gif.extend([2, 2, 0x4c, 0x01, 0]);
    }
    gif.push(0x3b);
    gif
}

#[tokio::test]
async fn an_animation_that_took_hundreds_of_megabytes_gives_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = reqwest::Client::new();
    // 300 x 570 x 570 = 97,470,000 frame pixels, under the cap of 100
    // million: 390 MB of RGBA frames from 6 KB.
    let gif = gif_of_dots(570, 300);
    assert!(gif.len() < 8 << 10);
    let (before, _) = resident(&server);
    let thumb = put_then_process(
        &client,
        &server,
        "dots.gif",
        "image/gif",
        gif,
        "resize:w_10",
    )
    .await;
    assert_eq!(thumb.status(), 200);
    let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(
        thumb.bytes().await.unwrap().to_vec(),
    ))
    .unwrap();
    let frames = image::AnimationDecoder::into_frames(frames)
        .collect_frames()
        .unwrap();
    assert_eq!(frames.len(), 300);
    assert_eq!(frames[0].buffer().dimensions(), (10, 10));
    // The answer is sent once the image thread is done; its trim follows.
    let (after, peak) = settled(&server).await;
    assert!(
        peak > 300 << 20,
        "the frames took {peak} bytes at most: the test made too little"
    );
    assert!(
        after < 100 << 20,
        "{after} bytes resident after the animation (peak {peak}, {before} before)"
    );

    // 300 x 580 x 580 = 100,920,000 frame pixels: refused.
    let refused = put_then_process(
        &client,
        &server,
        "more.gif",
        "image/gif",
        gif_of_dots(580, 300),
        "resize:w_10",
    )
    .await;
    assert!(refused.status().is_client_error(), "{}", refused.status());
    let body = refused.text().await.unwrap();
    assert!(
        body.contains("animation_too_large") && body.contains("100000000"),
        "{body}"
    );
}

#[tokio::test]
async fn a_large_image_with_alpha_leaves_no_copy_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = reqwest::Client::new();
    // 6000 x 5000 half-clear green: 120 MB as RGBA, a few KB as WebP. The
    // resizer premultiplies a copy of the whole source, which it used to
    // keep for the next image on its thread.
    let rgba = vec![[10u8, 200, 30, 128]; 6000 * 5000].concat();
    let webp = webp::Encoder::from_rgba(&rgba, 6000, 5000)
        .encode(50.0)
        .to_vec();
    drop(rgba);
    let thumb = put_then_process(
        &client,
        &server,
        "wide.webp",
        "image/webp",
        webp,
        "resize:w_60|format:t_png",
    )
    .await;
    assert_eq!(thumb.status(), 200);
    let thumb = image::load_from_memory(&thumb.bytes().await.unwrap()).unwrap();
    assert_eq!(image::GenericImageView::dimensions(&thumb), (60, 50));
    let (after, peak) = settled(&server).await;
    assert!(
        peak > 200 << 20,
        "the image took {peak} bytes at most: the test made too little"
    );
    assert!(
        after < 100 << 20,
        "{after} bytes resident after the image (peak {peak})"
    );
}

#[tokio::test]
async fn an_animation_over_the_frame_pixel_cap_is_refused_before_a_frame_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = reqwest::Client::new();
    // Two one-pixel frames on an 8000x8000 screen: 128 million frame
    // pixels, over the cap, each frame 256 MB once composited.
    let refused = put_then_process(
        &client,
        &server,
        "wide.gif",
        "image/gif",
        gif_of_dots(8000, 2),
        "resize:w_10",
    )
    .await;
    assert!(refused.status().is_client_error(), "{}", refused.status());
    let body = refused.text().await.unwrap();
    assert!(body.contains("animation_too_large"), "{body}");
    let (_, peak) = resident(&server);
    assert!(
        peak < 150 << 20,
        "{peak} bytes at most: a frame was composited before the refusal"
    );
}
