use image::{AnimationDecoder, DynamicImage, GenericImageView, Rgb, RgbImage, Rgba, RgbaImage};

use super::*;
use crate::action::Action;

/// The bytes of `fixtures/images/{name}` (also for the decoders' own tests).
pub(super) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/images/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn run(input: &[u8], action: &str) -> Result<Output, ImagingError> {
    process(
        input,
        &Action::parse(action).unwrap(),
        &Limits::default(),
        &NoWatermarks,
    )
}

fn run_image(input: &[u8], action: &str) -> (Encoded, DynamicImage) {
    let out = run(input, action).unwrap_or_else(|e| panic!("{action}: {e}"));
    let encoded = out.image.expect("an image");
    let decoded = image::load_from_memory(&encoded.bytes).unwrap();
    assert_eq!(
        (decoded.width(), decoded.height()),
        (encoded.width, encoded.height)
    );
    (encoded, decoded)
}

fn png(img: &DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

const CELL: u32 = 30;

/// A 3x3 grid of distinct colours, cell (col,row) = colour index row*3+col.
fn grid() -> DynamicImage {
    let colours = grid_colours();
    DynamicImage::ImageRgb8(RgbImage::from_fn(CELL * 3, CELL * 3, |x, y| {
        Rgb(colours[((y / CELL) * 3 + x / CELL) as usize])
    }))
}

fn grid_colours() -> [[u8; 3]; 9] {
    [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [0, 255, 255],
        [255, 0, 255],
        [128, 0, 0],
        [0, 128, 0],
        [0, 0, 128],
    ]
}

fn close(a: [u8; 3], b: [u8; 3], tol: u8) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= tol)
}

fn rgb_at(img: &DynamicImage, x: u32, y: u32) -> [u8; 3] {
    let p = img.get_pixel(x, y);
    [p[0], p[1], p[2]]
}

#[test]
fn each_gravity_takes_the_expected_cell() {
    let input = png(&grid());
    let colours = grid_colours();
    // QingStor: 0 centre, 1 N, 2 E, 3 S, 4 W, 5 NW, 6 NE, 7 SW, 8 SE -> grid cell index.
    let expected_cell = [4usize, 1, 5, 7, 3, 0, 2, 6, 8];
    for (g, cell) in expected_cell.iter().enumerate() {
        let (enc, img) = run_image(&input, &format!("crop:w_{CELL},h_{CELL},g_{g}"));
        assert_eq!((enc.width, enc.height), (CELL, CELL), "g_{g}");
        for (x, y) in [(0, 0), (CELL - 1, CELL - 1), (CELL / 2, CELL / 2)] {
            assert_eq!(rgb_at(&img, x, y), colours[*cell], "g_{g} at ({x},{y})");
        }
    }
}

#[test]
fn crop_by_offset_and_clamping() {
    let input = png(&grid());
    let colours = grid_colours();
    let (enc, img) = run_image(&input, "crop:l_60,t_30");
    assert_eq!((enc.width, enc.height), (30, 60));
    assert_eq!(rgb_at(&img, 0, 0), colours[5]);
    assert_eq!(rgb_at(&img, 29, 59), colours[8]);
    let (enc, _) = run_image(&input, "crop:w_1000,h_10,g_3");
    assert_eq!((enc.width, enc.height), (90, 10));
    let err = run(&input, "crop:l_500").err().unwrap();
    assert!(err.to_string().contains("outside the 90x90 image"), "{err}");
}

#[test]
fn gravity_auto_finds_the_busy_region() {
    // Flat grey with a saturated checkerboard in the bottom-right corner.
    let img = RgbImage::from_fn(600, 400, |x, y| {
        if x > 450 && y > 260 && ((x / 6 + y / 6) % 2 == 0) {
            Rgb([230, 20, 40])
        } else if x > 450 && y > 260 {
            Rgb([20, 200, 60])
        } else {
            Rgb([128, 128, 128])
        }
    });
    let (_, out) = run_image(&png(&DynamicImage::ImageRgb8(img)), "crop:w_150,h_140,g_9");
    let busy = out
        .to_rgb8()
        .pixels()
        .filter(|p| p[0] > 200 || p[1] > 180)
        .count();
    assert!(
        busy > 150 * 140 / 2,
        "auto crop missed the busy corner: {busy}"
    );
}

#[test]
fn gravity_auto_finds_a_small_vivid_subject_on_a_soft_coloured_ground() {
    // The ladybird (about 55x30 of 640x400, near (450, 210)) on blurred
    // green leaves whose chroma, 40-60, is high but not vivid.
    let photo = fixture("ladybird-640.jpg");
    for side in [150, 200, 250, 300] {
        let (_, out) = run_image(&photo, &format!("crop:w_{side},h_{side},g_9"));
        let red = out
            .to_rgb8()
            .pixels()
            .filter(|p| p[0] > 150 && p[1] < 90 && p[2] < 90)
            .count();
        assert!(
            red > 150,
            "{side}x{side}: the ladybird is not in the crop ({red} red pixels)"
        );
    }
}

#[test]
fn rotate_moves_a_known_corner_clockwise() {
    // 40x20, red 5x5 block at the top-left.
    let img = RgbImage::from_fn(40, 20, |x, y| {
        if x < 5 && y < 5 {
            Rgb([255, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let input = png(&DynamicImage::ImageRgb8(img));
    let cases = [
        (0, (40, 20), (1, 1)),
        (90, (20, 40), (18, 1)),
        (180, (40, 20), (38, 18)),
        (270, (20, 40), (1, 38)),
    ];
    for (a, dims, red) in cases {
        let (enc, out) = run_image(&input, &format!("rotate:a_{a}"));
        assert_eq!((enc.width, enc.height), dims, "a_{a}");
        assert_eq!(rgb_at(&out, red.0, red.1), [255, 0, 0], "a_{a}");
        assert_eq!(rgb_at(&out, dims.0 / 2, dims.1 / 2), [255, 255, 255]);
    }
}

#[test]
fn each_resize_mode_gives_the_exact_size() {
    let input = fixture("wood.jpg"); // 640x480
    let cases = [
        ("resize:w_300", (300, 225)),
        ("resize:h_120", (160, 120)),
        ("resize:w_300,h_300", (300, 300)),
        ("resize:w_300,h_300,m_0", (300, 300)),
        ("resize:w_300,h_300,m_1", (300, 225)),
        ("resize:w_300,h_100,m_1", (133, 100)),
        ("resize:w_300,h_300,m_2", (300, 300)),
        ("resize:w_100,h_300,m_2", (100, 300)),
        ("resize:w_1000", (1000, 750)),
        ("resize:w_1,h_1,m_2", (1, 1)),
    ];
    for (action, dims) in cases {
        let (enc, _) = run_image(&input, action);
        assert_eq!((enc.width, enc.height), dims, "{action}");
    }
}

#[test]
fn pad_mode_pads_white_or_transparent() {
    let (_, out) = run_image(&fixture("wood.jpg"), "resize:w_300,h_300,m_0|format:t_png");
    // 640x480 fits as 300x225, so 37 rows of white above and 38 below.
    assert_eq!(rgb_at(&out, 150, 5), [255, 255, 255]);
    assert_eq!(rgb_at(&out, 150, 295), [255, 255, 255]);
    assert_ne!(rgb_at(&out, 150, 150), [255, 255, 255]);
    let (_, out) = run_image(&fixture("goldfish-rgba.png"), "resize:w_300,h_300,m_0");
    assert_eq!(
        out.get_pixel(150, 2)[3],
        0,
        "padding of an alpha image is transparent"
    );
}

#[test]
fn exif_orientation_is_applied_before_the_first_operation() {
    let reference = run_image(&fixture("orientation-1.jpg"), "resize:w_90").1;
    assert_eq!((reference.width(), reference.height()), (90, 60));
    for n in 2..=8 {
        let (enc, out) = run_image(&fixture(&format!("orientation-{n}.jpg")), "resize:w_90");
        assert_eq!((enc.width, enc.height), (90, 60), "orientation {n}");
        let diff = mean_abs_diff(&reference, &out);
        assert!(diff < 12.0, "orientation {n} differs from 1 by {diff}");
    }
}

fn mean_abs_diff(a: &DynamicImage, b: &DynamicImage) -> f64 {
    let (a, b) = (a.to_rgb8(), b.to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

#[test]
fn grayscale_cmyk_and_16_bit_decode_to_the_same_picture() {
    let (_, colour) = run_image(&fixture("storm.jpg"), "format:t_png");
    let (_, cmyk) = run_image(&fixture("storm-cmyk.jpg"), "format:t_png");
    assert!(mean_abs_diff(&colour, &cmyk) < 12.0, "cmyk");
    let (_, gray) = run_image(&fixture("storm-gray.jpg"), "format:t_png");
    let luma = DynamicImage::ImageLuma8(colour.to_luma8());
    assert!(mean_abs_diff(&luma, &gray) < 12.0, "gray");
    let (_, g16) = run_image(&fixture("wood-grey16.png"), "format:t_png");
    assert_eq!((g16.width(), g16.height()), (320, 240));
    let (_, wood) = run_image(&fixture("wood.jpg"), "resize:w_320|format:t_png");
    let wood_luma = DynamicImage::ImageLuma8(wood.to_luma8());
    assert!(mean_abs_diff(&wood_luma, &g16) < 16.0, "grey16");
    let info = run(&fixture("storm-cmyk.jpg"), "info")
        .unwrap()
        .info
        .unwrap();
    assert_eq!(info["space"], "cmyk");
    // A CMYK TIFF is told as CMYK too, though its decoder gives RGB.
    let tiff = fixture("storm-cmyk.tif");
    assert_eq!(run(&tiff, "info").unwrap().info.unwrap()["space"], "cmyk");
    let (_, small) = run_image(&tiff, "format:t_png");
    let (_, reference) = run_image(&fixture("storm.jpg"), "resize:w_96,h_64|format:t_png");
    assert!(mean_abs_diff(&small, &reference) < 6.0, "cmyk tiff");
}

/// A print profile Debian ships (libgs-common, which `./dev` installs).
const CMYK_PROFILE: &str = "/usr/share/color/icc/ghostscript/default_cmyk.icc";

/// `rgb` as a CMYK JPEG of `profile`'s inks, stored inverted with Adobe's
/// marker as Photoshop writes them, with the profile embedded when `embed`.
fn cmyk_jpeg(rgb: &RgbImage, profile: &[u8], embed: bool) -> Vec<u8> {
    use moxcms::{ColorProfile, Layout, TransformOptions};
    let cmyk_profile = ColorProfile::new_from_slice(profile).unwrap();
    let to_cmyk = ColorProfile::new_srgb()
        .create_transform_8bit(
            Layout::Rgb,
            &cmyk_profile,
            Layout::Rgba,
            TransformOptions::default(),
        )
        .unwrap();
    let mut inks = vec![0u8; rgb.as_raw().len() / 3 * 4];
    to_cmyk.transform(rgb.as_raw(), &mut inks).unwrap();
    inks.iter_mut().for_each(|v| *v = 255 - *v);
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(95).unwrap();
    c.set_subsamp(turbojpeg::Subsamp::None).unwrap();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let jpeg = c
        .compress_to_vec(turbojpeg::Image {
            pixels: inks.as_slice(),
            width: w,
            pitch: w * 4,
            height: h,
            format: turbojpeg::PixelFormat::CMYK,
        })
        .unwrap();
    assert!(jpeg.windows(5).any(|w| w == b"Adobe"), "Adobe's marker");
    if !embed {
        return jpeg;
    }
    // The profile in APP2 chunks of at most 65519 bytes, after SOI.
    let chunks: Vec<&[u8]> = profile.chunks(65519).collect();
    let mut out = jpeg[..2].to_vec();
    for (i, chunk) in chunks.iter().enumerate() {
        out.extend_from_slice(&[0xff, 0xe2]);
        out.extend_from_slice(&((chunk.len() + 16) as u16).to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.extend_from_slice(&[i as u8 + 1, chunks.len() as u8]);
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn a_cmyk_jpeg_with_a_profile_is_converted_through_it() {
    let profile = std::fs::read(CMYK_PROFILE)
        .unwrap_or_else(|e| panic!("{CMYK_PROFILE}: {e} (the libgs-common package has it)"));
    let (_, original) = run_image(&fixture("storm.jpg"), "format:t_png");
    let rgb = original.to_rgb8();
    let (_, through) = run_image(&cmyk_jpeg(&rgb, &profile, true), "format:t_png");
    let (_, naive) = run_image(&cmyk_jpeg(&rgb, &profile, false), "format:t_png");
    let (good, bad) = (psnr(&through, &original), psnr(&naive, &original));
    // A print profile's inks, read as plain CMYK, come out dark and blue.
    assert!(
        good > 33.0 && bad < 22.0,
        "with the profile {good:.2} dB, without {bad:.2} dB"
    );
    let info = run(&cmyk_jpeg(&rgb, &profile, true), "info")
        .unwrap()
        .info
        .unwrap();
    assert_eq!(info["space"], "cmyk");
}

#[test]
fn a_cmyk_jpeg_cut_short_or_damaged_is_refused_not_filled_with_grey() {
    let cmyk = fixture("storm-cmyk.jpg");
    for keep in [cmyk.len() / 20, cmyk.len() / 2, cmyk.len() - 100] {
        let err = run(&cmyk[..keep], "format:t_png")
            .err()
            .unwrap_or_else(|| panic!("{keep} of {} bytes decoded", cmyk.len()));
        assert_eq!(err.code(), "decode_failed", "{keep}: {err}");
    }
    // A corrupt Huffman code halfway through the scan.
    let mut flipped = cmyk.clone();
    let mid = flipped.len() / 2;
    for b in &mut flipped[mid..mid + 64] {
        *b = 0xff - (*b & 0x0f);
    }
    assert_eq!(
        run(&flipped, "format:t_png").err().map(|e| e.code()),
        Some("decode_failed")
    );
}

#[test]
fn a_jpeg_cut_before_its_frame_header_says_so() {
    // Cut inside its EXIF segment (bytes 2-180), before SOF (at 318).
    let jpeg = fixture("orientation-6.jpg");
    let err = run(&jpeg[..100], "info").err().unwrap();
    assert_eq!(err.code(), "decode_failed");
    assert!(
        err.to_string().contains("ends before its frame header"),
        "{err}"
    );
}

#[test]
fn every_format_round_trips() {
    let (_, original) = run_image(&fixture("storm.jpg"), "format:t_png");
    let input = fixture("storm.jpg");
    for (t, format, tol) in [
        ("jpeg", ImageFormat::Jpeg, 6.0),
        ("png", ImageFormat::Png, 0.01),
        ("webp", ImageFormat::Webp, 6.0),
        ("tiff", ImageFormat::Tiff, 0.01),
    ] {
        let (enc, out) = run_image(&input, &format!("format:t_{t},q_90"));
        assert_eq!(enc.format, format);
        assert_eq!(probe(&enc.bytes).unwrap().0, format);
        let d = mean_abs_diff(&original, &out);
        assert!(d <= tol, "{t}: mean difference {d}");
    }
    // Lossy WebP: quality changes the size.
    let small = run_image(&input, "format:t_webp,q_10").0.bytes.len();
    let large = run_image(&input, "format:t_webp,q_95").0.bytes.len();
    assert!(small * 2 < large, "webp q10 {small} vs q95 {large}");
    let small = run_image(&input, "format:t_jpeg,q_10").0.bytes.len();
    let large = run_image(&input, "format:t_jpeg,q_95").0.bytes.len();
    assert!(small * 2 < large, "jpeg q10 {small} vs q95 {large}");
}

#[test]
fn alpha_is_kept_where_the_format_can_and_flattened_on_white_for_jpeg() {
    let img = RgbaImage::from_fn(20, 20, |x, _| {
        if x < 10 {
            Rgba([0, 0, 255, 0])
        } else {
            Rgba([0, 0, 255, 255])
        }
    });
    let input = png(&DynamicImage::ImageRgba8(img));
    for t in ["png", "webp", "tiff"] {
        let (_, out) = run_image(&input, &format!("format:t_{t}"));
        assert!(out.color().has_alpha(), "{t}");
        assert_eq!(out.get_pixel(2, 2)[3], 0, "{t}");
        assert_eq!(out.get_pixel(15, 2)[3], 255, "{t}");
    }
    let (_, out) = run_image(&input, "format:t_jpeg,q_95");
    assert!(close(rgb_at(&out, 2, 10), [255, 255, 255], 8));
    assert!(close(rgb_at(&out, 17, 10), [0, 0, 255], 16));
}

#[test]
fn output_keeps_the_input_format_without_format() {
    for (name, format) in [
        ("storm.jpg", ImageFormat::Jpeg),
        ("goldfish-rgba.png", ImageFormat::Png),
        ("adwaita.webp", ImageFormat::Webp),
        ("ladybird-animated.gif", ImageFormat::Gif),
    ] {
        let (enc, _) = run_image(&fixture(name), "resize:w_50");
        assert_eq!(enc.format, format, "{name}");
    }
}

#[test]
fn animated_gif_keeps_every_frame_through_geometry() {
    let input = fixture("ladybird-animated.gif");
    let out = run(&input, "crop:w_400,h_300,g_0|rotate:a_90|resize:w_150")
        .unwrap()
        .image
        .unwrap();
    assert_eq!(out.format, ImageFormat::Gif);
    assert_eq!((out.width, out.height), (150, 200));
    let decoded = decode(&out.bytes, &Limits::default(), Lead::Nothing).unwrap();
    match decoded.pixels {
        Pixels::Animated(frames) => {
            assert_eq!(frames.len(), 4);
            assert!(frames.iter().all(|f| f.buffer().dimensions() == (150, 200)));
        }
        Pixels::Still(_) => panic!("animation lost"),
    }
    let limits = Limits {
        max_frames: 3,
        ..Limits::default()
    };
    let err = decode(&input, &limits, Lead::Nothing).err().unwrap();
    assert!(
        matches!(err, ImagingError::AnimationTooLarge { frames: 4, .. }),
        "{err}"
    );
}

#[test]
fn enlarging_an_animation_is_bounded_like_decoding_it() {
    // With a bound of 100 million frame pixels, four frames of 6000x6000
    // (144 million) are refused before any frame is resized, where the same
    // size as one still is allowed.
    let input = fixture("ladybird-animated.gif");
    let limits = Limits {
        max_animation_pixels: 100_000_000,
        ..Limits::default()
    };
    let action = Action::parse("resize:w_6000,h_6000,m_2").unwrap();
    let err = process(&input, &action, &limits, &NoWatermarks)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            ImagingError::AnimationTooLarge {
                frames: 4,
                width: 6000,
                height: 6000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), "animation_too_large");
    // Within the bound, an enlarged animation keeps its frames.
    let out = run(&input, "resize:w_800").unwrap().image.unwrap();
    assert_eq!(out.width, 800);
    let decoded = decode(&out.bytes, &Limits::default(), Lead::Nothing).unwrap();
    assert!(matches!(decoded.pixels, Pixels::Animated(ref f) if f.len() == 4));
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in bytes {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that declares 60000x60000 pixels and carries almost no data.
fn png_bomb() -> Vec<u8> {
    png_header_only(60000, 60000)
}

/// A PNG that declares `width`x`height` RGB pixels and carries almost no data.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

/// A real JPEG whose frame header is patched to claim 60000x60000.
fn jpeg_bomb() -> Vec<u8> {
    let mut jpeg = fixture("storm.jpg");
    // Walk the marker segments to the frame header.
    let mut at = 2;
    while !(jpeg[at] == 0xff && (0xc0..=0xc2).contains(&jpeg[at + 1])) {
        at += 2 + u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
    }
    let sof = at;
    jpeg[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
    jpeg
}

#[test]
fn decompression_bombs_are_refused_from_the_header() {
    for bomb in [png_bomb(), jpeg_bomb()] {
        let err = run(&bomb, "resize:w_10").err().unwrap();
        assert!(
            matches!(
                err,
                ImagingError::TooManyPixels {
                    width: 60000,
                    height: 60000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("over the limit of 100000000 pixels")
        );
    }
    assert!(png_bomb().len() < 200);
    // Within the pixel limit, but a side the resampler would need gigabytes
    // of filter weights to shrink.
    for (w, h) in [(100_000_000, 1), (1, 2_000_000)] {
        let err = run(&png_header_only(w, h), "resize:w_10").err().unwrap();
        assert_eq!(err.code(), "too_many_pixels");
        assert!(
            err.to_string()
                .contains(&format!("{w}x{h}, a side over the limit of 1048576 pixels")),
            "{err}"
        );
    }
}

/// A GIF whose screen is 1x1 but whose one frame claims `side`x`side`, with
/// a few bytes of LZW data (a clear code and the end code).
fn gif_frame_bomb(side: u16) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend([1, 0, 1, 0, 0x80, 0, 0]); // 1x1 screen, 2-colour table
    gif.extend([0, 0, 0, 255, 255, 255]);
    gif.extend([0x2c, 0, 0, 0, 0]); // frame at (0, 0)
    gif.extend(side.to_le_bytes());
    gif.extend(side.to_le_bytes());
    gif.extend([0, 2, 1, 0x2c, 0, 0x3b]);
    gif
}

#[test]
fn a_gif_frame_larger_than_its_screen_is_refused_before_it_is_allocated() {
    // 30000x30000 would be 3.6 GB of RGBA for a 1x1 picture.
    let bomb = gif_frame_bomb(30000);
    assert!(bomb.len() < 40);
    for action in ["info", "resize:w_10"] {
        let err = run(&bomb, action).err().unwrap();
        assert_eq!(err.code(), "decode_failed");
        assert!(
            err.to_string()
                .contains("cannot decode gif image: a frame is larger than its 1x1 screen allows"),
            "{err}"
        );
    }
    // A frame a little past its screen, as some encoders write, still decodes.
    let mut gif = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut gif)
        .encode(&[200; 4 * 4 * 4], 4, 4, image::ExtendedColorType::Rgba8)
        .unwrap();
    gif[6..10].copy_from_slice(&[2, 0, 2, 0]);
    let out = run(&gif, "info").unwrap().info.unwrap();
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(2), Some(2))
    );
}

#[test]
fn other_limits_name_the_limit() {
    let input = fixture("storm.jpg");
    let limits = Limits {
        max_input_bytes: 1000,
        ..Limits::default()
    };
    let err = process(
        &input,
        &Action::parse("info").unwrap(),
        &limits,
        &NoWatermarks,
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("over the limit of 1000 bytes"),
        "{err}"
    );
    let err = run(&input, "resize:w_20000").err().unwrap();
    assert!(err.to_string().contains("limit of 16384 px"), "{err}");
    let err = run(b"definitely not an image", "info").err().unwrap();
    assert_eq!(err.code(), "not_an_image");
    let mut truncated = input.clone();
    truncated.truncate(3000);
    let err = run(&truncated, "resize:w_10");
    // libjpeg-turbo fills a truncated scan with grey; either outcome must not panic.
    if let Err(e) = err {
        assert_eq!(e.code(), "decode_failed");
    }
}

#[test]
fn info_describes_the_processed_image_and_source_exif() {
    let out = run(&fixture("storm.jpg"), "resize:w_100|format:t_png|info").unwrap();
    assert!(out.image.is_none());
    let info = out.info.unwrap();
    assert_eq!(info["width"], 100);
    assert_eq!(info["height"], 67);
    assert_eq!(info["type"], "png");
    assert_eq!(info["alpha"], false);
    assert_eq!(info["space"], "srgb");
    let info = run(&fixture("orientation-6.jpg"), "info")
        .unwrap()
        .info
        .unwrap();
    assert_eq!(info["orientation"], 6);
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(450), Some(300))
    );
}

/// EXIF (a TIFF structure) holding `fields` of the primary image.
fn exif_tiff(fields: &[(exif::Tag, exif::Value)]) -> Vec<u8> {
    let fields: Vec<exif::Field> = fields
        .iter()
        .map(|(tag, value)| exif::Field {
            tag: *tag,
            ifd_num: exif::In::PRIMARY,
            value: value.clone(),
        })
        .collect();
    let mut writer = exif::experimental::Writer::new();
    for field in &fields {
        writer.push_field(field);
    }
    let mut tiff = std::io::Cursor::new(Vec::new());
    writer.write(&mut tiff, false).unwrap();
    tiff.into_inner()
}

#[test]
fn info_gives_the_gps_altitude_with_its_reference() {
    // An APP1 segment with GPSAltitude 123.4 and GPSAltitudeRef 1.
    use exif::{Rational, Tag, Value};
    let tiff = exif_tiff(&[
        (
            Tag::GPSAltitude,
            Value::Rational(vec![Rational {
                num: 1234,
                denom: 10,
            }]),
        ),
        (Tag::GPSAltitudeRef, Value::Byte(vec![1])),
    ]);
    let jpeg = fixture("storm.jpg");
    let mut app1 = vec![0xff, 0xe1];
    app1.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
    app1.extend_from_slice(b"Exif\0\0");
    app1.extend_from_slice(&tiff);
    let tagged = [&jpeg[..2], &app1, &jpeg[2..]].concat();
    let info = run(&tagged, "info").unwrap().info.unwrap();
    assert_eq!(info["gpsaltitude"], "123.4", "{info}");
    assert_eq!(info["gpsaltituderef"], "below sea level", "{info}");
}

#[test]
fn a_resize_moved_before_a_turn_names_the_sides_asked_for() {
    // 300x200 turned is 200x300; w_20000 makes it 20000x30000, which the
    // error says, though the resize ran first (as 30000x20000).
    let png = png(&DynamicImage::ImageRgb8(RgbImage::new(300, 200)));
    for (action, sides) in [
        ("rotate:a_90|resize:w_20000", "20000x30000"),
        ("rotate:a_90|rotate:a_90|resize:w_20000", "20000x13333"),
        ("rotate:a_270|format:t_png|resize:h_20000", "13333x20000"),
    ] {
        let err = run(&png, action).unwrap_err().to_string();
        assert!(err.contains(sides), "{action}: {err}");
    }
    // The same for the frames of an animation (640x400, four frames).
    let gif = fixture("ladybird-animated.gif");
    let err = run(&gif, "rotate:a_90|resize:w_5000")
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 frames of 5000x8000"), "{err}");
}

#[test]
fn a_16_bit_tiff_is_brought_to_8_bits_a_strip_at_a_time_as_the_image_crate_would() {
    // Grey, RGB and RGBA, each with a gradient that uses the low byte,
    // written by the image crate (in strips; it writes no grey and alpha).
    let (w, h) = (70u32, 90u32);
    let sample = |x: u32, y: u32, c: u32| ((x * 937 + y * 613 + c * 10_007) % 65_536) as u16;
    let grey = image::ImageBuffer::from_fn(w, h, |x, y| image::Luma([sample(x, y, 0)]));
    let rgb = image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Rgb([sample(x, y, 0), sample(x, y, 1), sample(x, y, 2)])
    });
    let rgba = image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Rgba([sample(x, y, 0), sample(x, y, 1), sample(x, y, 2), 65_535])
    });
    for source in [
        DynamicImage::ImageLuma16(grey),
        DynamicImage::ImageRgb16(rgb),
        DynamicImage::ImageRgba16(rgba),
    ] {
        let mut tiff = std::io::Cursor::new(Vec::new());
        source
            .write_to(&mut tiff, image::ImageFormat::Tiff)
            .unwrap();
        let tiff = tiff.into_inner();
        assert!(
            super::decode::decode_tiff_16(&tiff, &Limits::default()).is_some(),
            "{:?} takes the strip path",
            source.color()
        );
        let (_, got) = run_image(&tiff, "format:t_png");
        assert_eq!(got.to_rgba8(), source.to_rgba8(), "{:?}", source.color());
    }
}

#[test]
fn a_jpeg_compressed_ycbcr_tiff_is_decoded() {
    // libvips' `compression=jpeg` at its default quality (and sharp's
    // default TIFF) store YCbCr, 4:2:0, in strips of 128 rows: the same
    // photo as storm.jpg, re-encoded, so close to its pixels. Its samples
    // taken for RGB would be far off.
    let (out, tiff) = run_image(&fixture("storm-ycbcr-jpeg.tif"), "format:t_png");
    let (_, jpeg) = run_image(&fixture("storm.jpg"), "format:t_png");
    assert_eq!((out.width, out.height), (480, 320));
    let db = psnr(&tiff, &jpeg);
    assert!(db > 40.0, "{db:.1} dB");
    let info = run(&fixture("storm-ycbcr-jpeg.tif"), "info")
        .unwrap()
        .info
        .unwrap();
    assert_eq!(info["type"], "tiff", "{info}");
}

#[test]
fn info_bounds_exif_values_a_file_makes_huge() {
    // A Make of 100,000 shorts and a Model of 100,000 characters: left out
    // and cut, not copied into the result. One integer where a rational
    // belongs is still given.
    use exif::{Tag, Value};
    let tiff = exif_tiff(&[
        (Tag::Make, Value::Short(vec![7; 100_000])),
        (Tag::Model, Value::Ascii(vec![vec![b'M'; 100_000]])),
        (Tag::FocalLength, Value::Long(vec![35])),
        (
            Tag::GPSAltitude,
            Value::SRational(vec![exif::SRational { num: -5, denom: 2 }]),
        ),
    ]);
    // Too long for one APP1 segment of a JPEG: in a PNG's eXIf chunk.
    let info = run(&png_with_exif(&tiff, 16, 16), "info")
        .unwrap()
        .info
        .unwrap();
    assert!(
        info.get("make").is_none(),
        "{}",
        info["make"].to_string().len()
    );
    assert_eq!(info["model"], "M".repeat(256));
    assert_eq!(info["focallength"], "35", "{info}");
    assert_eq!(info["gpsaltitude"], "-2.5", "{info}");
}

/// A grey `width` x `height` PNG with `tiff` (EXIF) in an eXIf chunk after
/// the signature and IHDR (8 + 25 bytes).
fn png_with_exif(tiff: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::from_pixel(width, height, image::Rgb([9, 9, 9]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut chunk = (tiff.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"eXIf");
    chunk.extend_from_slice(tiff);
    let crc = crc32fast::hash(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    [&png[..33], &chunk, &png[33..]].concat()
}

#[test]
fn a_png_is_turned_by_the_orientation_in_its_exif_chunk() {
    let tiff = exif_tiff(&[(exif::Tag::Orientation, exif::Value::Short(vec![6]))]);
    let info = run(&png_with_exif(&tiff, 40, 30), "info")
        .unwrap()
        .info
        .unwrap();
    assert_eq!(info["orientation"], 6, "{info}");
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(30), Some(40))
    );
}

#[test]
fn save_yields_an_extra_output() {
    let out = run(
        &fixture("storm.jpg"),
        "resize:w_100|save:b_thumbs,k_small/storm.jpg|resize:w_50|format:t_png",
    )
    .unwrap();
    assert_eq!(out.saves.len(), 1);
    let save = &out.saves[0];
    assert_eq!(
        (save.bucket.as_str(), save.key.as_str()),
        ("thumbs", "small/storm.jpg")
    );
    assert_eq!(
        (save.image.width, save.image.format),
        (100, ImageFormat::Jpeg)
    );
    assert_eq!(
        image::load_from_memory(&save.image.bytes).unwrap().width(),
        100
    );
    let main = out.image.unwrap();
    assert_eq!((main.width, main.format), (50, ImageFormat::Png));
}

struct FixtureResolver;

impl WatermarkResolver for FixtureResolver {
    fn resolve(&self, url: &str) -> Result<Vec<u8>, String> {
        match url {
            "s3://marks/blue.png" => Ok(png(&DynamicImage::ImageRgba8(RgbaImage::from_pixel(
                10,
                10,
                Rgba([0, 0, 255, 255]),
            )))),
            "s3://marks/two-frames.gif" => Ok(gif_with_bomb_second_frame()),
            "s3://marks/red-blue.png" => Ok(png(&DynamicImage::ImageRgb8(RgbImage::from_fn(
                30,
                20,
                |x, _| {
                    if x < 15 {
                        Rgb([255, 0, 0])
                    } else {
                        Rgb([0, 0, 255])
                    }
                },
            )))),
            // One column over the watermark limit (small as a PNG).
            "s3://marks/huge.png" => Ok(png(&DynamicImage::ImageLuma8(image::GrayImage::new(
                4097, 4096,
            )))),
            _ => Err(format!("no such object {url}")),
        }
    }
}

/// A 4x4 blue GIF whose second frame claims 30000x30000.
fn gif_with_bomb_second_frame() -> Vec<u8> {
    let mut gif = Vec::new();
    let blue: Vec<u8> = [0, 0, 255, 255].repeat(16);
    image::codecs::gif::GifEncoder::new(&mut gif)
        .encode(&blue, 4, 4, image::ExtendedColorType::Rgba8)
        .unwrap();
    assert_eq!(gif.pop(), Some(0x3b));
    gif.extend([0x2c, 0, 0, 0, 0]);
    gif.extend(30000u16.to_le_bytes());
    gif.extend(30000u16.to_le_bytes());
    gif.extend([0, 2, 1, 0x2c, 0, 0x3b]);
    gif
}

#[test]
fn a_watermark_overlay_decodes_only_its_first_frame() {
    use base64::Engine as _;
    let white = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        20,
        20,
        Rgb([255, 255, 255]),
    )));
    let u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("s3://marks/two-frames.gif");
    let action = Action::parse(&format!("watermark_image:u_{u},l_2,t_2,p_1|format:t_png")).unwrap();
    let out = process(&white, &action, &Limits::default(), &FixtureResolver).unwrap();
    let img = image::load_from_memory(&out.image.unwrap().bytes).unwrap();
    assert_eq!(rgb_at(&img, 3, 3), [0, 0, 255]);
    assert_eq!(rgb_at(&img, 7, 7), [255, 255, 255]);
    // Decoded as an image, the second frame is read and refused.
    let err = run(&gif_with_bomb_second_frame(), "info").err().unwrap();
    assert!(err.to_string().contains("a frame is larger"), "{err}");
}

#[test]
fn watermark_image_composites_at_the_offset_with_opacity() {
    let white = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        40,
        40,
        Rgb([255, 255, 255]),
    )));
    let action = |p: &str| {
        use base64::Engine as _;
        let u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("s3://marks/blue.png");
        Action::parse(&format!("watermark_image:u_{u},l_5,t_5,p_{p}|format:t_png")).unwrap()
    };
    let out = process(&white, &action("1"), &Limits::default(), &FixtureResolver).unwrap();
    let img = image::load_from_memory(&out.image.unwrap().bytes).unwrap();
    assert_eq!(rgb_at(&img, 7, 7), [0, 0, 255]);
    assert_eq!(rgb_at(&img, 2, 2), [255, 255, 255]);
    assert_eq!(rgb_at(&img, 20, 20), [255, 255, 255]);
    let out = process(
        &white,
        &action("0.25"),
        &Limits::default(),
        &FixtureResolver,
    )
    .unwrap();
    let img = image::load_from_memory(&out.image.unwrap().bytes).unwrap();
    assert!(
        close(rgb_at(&img, 7, 7), [191, 191, 255], 4),
        "{:?}",
        rgb_at(&img, 7, 7)
    );
    let err = process(
        &white,
        &Action::parse("watermark_image:u_czM6Ly9uby9zdWNo").unwrap(),
        &Limits::default(),
        &FixtureResolver,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("s3://no/such"), "{err}");
    // A logo is held to a logo's size, under the input limit.
    let u = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("s3://marks/huge.png")
    };
    let err = process(
        &white,
        &Action::parse(&format!("watermark_image:u_{u}")).unwrap(),
        &Limits::default(),
        &FixtureResolver,
    )
    .err()
    .unwrap();
    assert_eq!(err.code(), "watermark_unavailable");
    assert!(err.to_string().contains("16777216"), "{err}");
}

#[test]
fn a_text_watermark_that_would_draw_nothing_fails() {
    let white = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        60,
        40,
        Rgb([255, 255, 255]),
    )));
    // A space, a line break, an emoji the font lacks.
    for text in ["IA", "Cg", "8J-YgA"] {
        let err = run(&white, &format!("watermark:t_{text}")).err().unwrap();
        assert_eq!(err.code(), "operation_failed", "{text}");
        assert!(
            err.to_string().contains("no character the font draws"),
            "{err}"
        );
    }
    // A character it has beside one it lacks still marks.
    run(&white, "watermark:t_QfCfmIA").unwrap();
}

#[test]
fn text_watermark_changes_pixels_over_the_whole_image() {
    let white = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        600,
        400,
        Rgb([255, 255, 255]),
    )));
    // 水印文字 in red (#ff0000) at opacity 1.
    let (_, out) = run_image(
        &white,
        "watermark:t_5rC05Y2w5paH5a2X,c_I2ZmMDAwMA,p_1|format:t_png",
    );
    let rgb = out.to_rgb8();
    for (qx, qy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        let changed = (0..200)
            .flat_map(|y| (0..300).map(move |x| (qx * 300 + x, qy * 200 + y)))
            .filter(|&(x, y)| rgb.get_pixel(x, y)[1] < 128)
            .count();
        assert!(
            changed > 50,
            "quadrant ({qx},{qy}) has {changed} marked pixels"
        );
    }
    assert!(
        rgb.pixels().any(|p| p[0] > 200 && p[1] < 60 && p[2] < 60),
        "red text"
    );
}

fn psnr(a: &DynamicImage, b: &DynamicImage) -> f64 {
    let (a, b) = (a.to_rgb8(), b.to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

/// PSNR over every channel, alpha included, colours weighted by their
/// alpha (what shows when composited: a transparent pixel's colour does not).
fn psnr_rgba(a: &DynamicImage, b: &DynamicImage) -> f64 {
    let (a, b) = (a.to_rgba8(), b.to_rgba8());
    assert_eq!(a.dimensions(), b.dimensions());
    let shown = |p: &Rgba<u8>| {
        let alpha = p[3] as f64 / 255.0;
        [
            p[0] as f64 * alpha,
            p[1] as f64 * alpha,
            p[2] as f64 * alpha,
            p[3] as f64,
        ]
    };
    let mse = a
        .pixels()
        .zip(b.pixels())
        .flat_map(|(x, y)| {
            let (x, y) = (shown(x), shown(y));
            (0..4).map(move |c| (x[c] - y[c]).powi(2))
        })
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

#[test]
fn resizing_before_rotating_gives_the_pictures_of_the_written_order() {
    // PNG and GIF sources: no shrink-on-load, so only the order differs.
    let storm = png(&image::load_from_memory(&fixture("storm.jpg")).unwrap());
    let inputs = [
        ("storm", storm),
        ("goldfish-rgba", fixture("goldfish-rgba.png")),
        ("ladybird-animated", fixture("ladybird-animated.gif")),
    ];
    for (name, input) in &inputs {
        for action in [
            "rotate:a_90|resize:w_150",
            "rotate:a_270|resize:h_61",
            "rotate:a_90|resize:w_120,h_90,m_2",
            "rotate:a_90|resize:w_120,h_90,m_1",
            "rotate:a_180|resize:w_100,h_100,m_2",
            "rotate:a_180|resize:w_100,h_100,m_1",
            // Odd sides, whose scaled sizes round from halves.
            "crop:w_201,h_133|rotate:a_90|resize:w_67",
            "crop:w_200|rotate:a_90|rotate:a_90|rotate:a_90|resize:w_70",
        ] {
            let parsed = Action::parse(action).unwrap();
            assert_ne!(
                *geometry::resize_before_rotate(&parsed),
                parsed,
                "{action} is reordered"
            );
            // PNG out (an animation's first frame): lossless, unlike GIF.
            let (_, fast) = run_image(input, &format!("{action}|format:t_png"));
            // The written order, one operation at a time.
            let limits = Limits::default();
            let mut slow = decode(input, &limits, Lead::Nothing).unwrap().pixels;
            for op in &parsed.ops {
                geometry::apply(&mut slow, op, &limits).unwrap();
            }
            let slow = slow.into_first_frame();
            assert_eq!(fast.dimensions(), slow.dimensions(), "{name}: {action}");
            // The resampler rounds between its passes, whose order turns
            // with the image: within a level or so, not the same bytes.
            let db = psnr_rgba(&fast, &slow);
            assert!(db > 45.0, "{name}: {action}: {db:.1} dB");
        }
    }
    // A JPEG is now also shrunk on load, as a resize that comes first is.
    let jpeg = fixture("storm.jpg");
    for action in [
        "rotate:a_90|resize:w_100",
        "rotate:a_90|resize:w_100,h_100,m_2",
    ] {
        let (_, fast) = run_image(&jpeg, &format!("{action}|format:t_png"));
        let (_, slow) = run_image(&jpeg, &format!("rotate:a_0|{action}|format:t_png"));
        let db = psnr(&fast, &slow);
        assert!(db > 38.0, "{action}: {db:.1} dB");
    }
}

#[test]
fn decoding_only_the_region_matches_cropping_after_a_full_decode() {
    // `rotate:a_0` first keeps the decoder from folding the crop or resize in.
    for input in [fixture("storm.jpg"), fixture("wood.jpg")] {
        for action in [
            "crop:w_100,h_80,g_6",
            "crop:w_77,h_300,g_0",
            "crop:l_33,t_17,w_120,h_90",
            "resize:w_100,h_100,m_2",
            "resize:w_40,h_200,m_2",
            "resize:w_150",
        ] {
            let (fast_enc, fast) = run_image(&input, &format!("{action}|format:t_png"));
            let (_, slow) = run_image(&input, &format!("rotate:a_0|{action}|format:t_png"));
            let db = psnr(&fast, &slow);
            assert!(
                db > 38.0,
                "{action}: {db:.1} dB ({}x{})",
                fast_enc.width,
                fast_enc.height
            );
        }
    }
}

/// The decoded output of `action` (which ends in `format:t_png`).
fn output_image(input: &[u8], action: &str) -> DynamicImage {
    let out = run(input, action).unwrap().image.unwrap();
    image::load_from_memory(&out.bytes).unwrap()
}

#[test]
fn shrunk_jpegs_are_sized_and_sampled_from_the_whole_image() {
    // Sides of 450 and 300 leave partial blocks (2 and 4 of 8 pixels) on
    // the right and bottom, which each EXIF orientation moves elsewhere.
    // Shrunk on load by 8, the result must match a resize of the full
    // decode (`rotate:a_0` keeps the decoder from folding the resize in):
    // the same size, and the same picture.
    for o in 1..=8 {
        let jpeg = fixture(&format!("orientation-{o}.jpg"));
        for (resize, size) in [
            ("resize:w_40", (40, 27)),
            ("resize:h_20", (30, 20)),
            ("resize:w_38,h_38,m_2", (38, 38)),
            ("resize:w_38,h_38,m_0", (38, 38)),
        ] {
            let shrunk = output_image(&jpeg, &format!("{resize}|format:t_png"));
            let full = output_image(&jpeg, &format!("rotate:a_0|{resize}|format:t_png"));
            assert_eq!(shrunk.dimensions(), size, "orientation {o} {resize}");
            assert_eq!(full.dimensions(), size, "orientation {o} {resize}");
            // 39-46 dB; sampling the whole canvas, partial blocks included,
            // gives 21-30 dB where an orientation moves them to the start.
            let db = psnr(&shrunk, &full);
            assert!(db > 36.0, "orientation {o} {resize}: {db:.1} dB");
        }
    }
    // 1000x333 shrinks by 8 to 125x42, whose last row is 5/8 image: a
    // 100-wide resize is 100x33 as round(333 x 100 / 1000) says, not 100x34.
    let mut jpeg = Vec::new();
    let photo = image::load_from_memory(&fixture("storm.jpg"))
        .unwrap()
        .resize_exact(1000, 333, image::imageops::FilterType::Triangle);
    photo
        .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut jpeg, 90,
        ))
        .unwrap();
    for (resize, size) in [("resize:w_100", (100, 33)), ("resize:w_700", (700, 233))] {
        let shrunk = output_image(&jpeg, &format!("{resize}|format:t_png"));
        let full = output_image(&jpeg, &format!("rotate:a_0|{resize}|format:t_png"));
        assert_eq!(shrunk.dimensions(), size, "{resize}");
        assert_eq!(full.dimensions(), size, "{resize}");
        assert!(psnr(&shrunk, &full) > 36.0, "{resize}");
    }
}

#[test]
fn resize_limits_hold_the_output_not_what_is_never_made() {
    let png = |w: u32, h: u32| {
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb([9, 99, 199])))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    // A cover box is sampled from a thin source in one pass: the 100x100000
    // whole it is notionally cut from is never made.
    for (w, h) in [(1, 1000), (10000, 10)] {
        let out = run(&png(w, h), "resize:w_100,h_100,m_2")
            .unwrap()
            .image
            .unwrap();
        assert_eq!((out.width, out.height), (100, 100), "{w}x{h}");
    }
    // Each side within 16384 can still make 268 million pixels: refused by
    // the pixel limit the input is held to.
    for action in ["resize:w_16384,h_16384", "resize:w_16384,h_16383,m_0"] {
        let err = run(&png(1, 1), action).err().unwrap();
        assert_eq!(err.code(), "output_too_large", "{action}");
        assert!(
            err.to_string()
                .contains("over the limit of 100000000 pixels"),
            "{err}"
        );
    }
    // WebP holds at most 16383 px per side: named before the encoder fails.
    let err = run(&png(16384, 1), "format:t_webp").err().unwrap();
    assert_eq!(err.code(), "output_too_large");
    assert!(
        err.to_string()
            .contains("format: output would be 16384x1, over the limit of 16383 px per side"),
        "{err}"
    );
    // So does JPEG (65500): a wide strip within every input limit is
    // `output_too_large`, not an encoder's failure.
    let err = run(&png(65536, 1), "format:t_jpeg").err().unwrap();
    assert_eq!(err.code(), "output_too_large");
    assert!(
        err.to_string()
            .contains("output would be 65536x1, over the limit of 65500 px per side"),
        "{err}"
    );
    let err = run(&png(1, 1), "resize:w_16385").err().unwrap();
    assert!(
        err.to_string()
            .ends_with("over the limit of 16384 px per side"),
        "{err}"
    );
    // The size is told as it would be, not saturated at 4294967295.
    let err = run(&png(1, 60000), "resize:w_100000").err().unwrap();
    assert_eq!(
        err.to_string(),
        "resize: output would be 100000x6000000000, over the limit of 16384 px per side"
    );
}

#[test]
fn jpegs_libjpeg_turbo_cannot_crop_are_decoded_whole_and_cut() {
    // Luma sampled 3x1: libjpeg-turbo decodes it but refuses a cropping
    // region, so only a region is cut from the whole decode.
    let odd = fixture("storm-3x1.jpg");
    for (action, size) in [
        ("resize:w_100", (100u64, 67u64)),
        ("info", (480, 320)),
        ("resize:w_100,h_100,m_2", (100, 100)),
        ("crop:w_50,h_60,l_70,t_30", (50, 60)),
    ] {
        let out = run(&odd, &format!("{action}|info")).unwrap().info.unwrap();
        assert_eq!(
            (out["width"].as_u64(), out["height"].as_u64()),
            (Some(size.0), Some(size.1)),
            "{action}"
        );
    }
    // The region cut from the whole decode is the region of the whole decode.
    let region = output_image(&odd, "crop:w_50,h_60,l_70,t_30|format:t_png");
    let whole = output_image(&odd, "format:t_png");
    assert_eq!(
        region.to_rgb8().as_raw(),
        whole.crop_imm(70, 30, 50, 60).to_rgb8().as_raw()
    );
}

#[test]
fn a_gif_frame_the_size_of_its_screen_plus_the_slack_decodes() {
    // A partial frame makes the decoder hold its canvas, the frame and a
    // second canvas at once: a 2100x2100 frame (over 16 MB of RGBA) at
    // (50, 50) on a 2200x2200 screen fits the budget.
    let blank = image::RgbaImage::from_pixel(2200, 2200, Rgba([0, 0, 0, 255]));
    let patch = image::RgbaImage::from_pixel(2100, 2100, Rgba([255, 255, 255, 255]));
    let mut gif = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new_with_speed(&mut gif, 30);
        encoder
            .encode_frames([
                image::Frame::new(blank),
                image::Frame::from_parts(patch, 50, 50, image::Delay::from_numer_denom_ms(100, 1)),
            ])
            .unwrap();
    }
    let decoded = decode(&gif, &Limits::default(), Lead::Nothing).unwrap();
    let Pixels::Animated(frames) = decoded.pixels else {
        panic!("two frames");
    };
    assert_eq!(frames.len(), 2);
    assert_eq!(
        frames[1].buffer().get_pixel(1000, 1000).0,
        [255, 255, 255, 255]
    );
}

#[test]
fn a_gif_is_quantised_on_every_pixel_up_to_256_ki_pixels_and_sampled_beyond() {
    // More than 256 colours, so the quantiser runs; on every pixel of an
    // output at the pixel limit it would take minutes of a thread.
    let still = |w: u32, h: u32| {
        RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, (x * y % 251) as u8]))
    };
    let at_speed = |img: &RgbImage, speed| {
        let mut gif = Vec::new();
        image::codecs::gif::GifEncoder::new_with_speed(&mut gif, speed)
            .encode_frame(image::Frame::new(
                DynamicImage::ImageRgb8(img.clone()).to_rgba8(),
            ))
            .unwrap();
        gif
    };
    // 300x200: every pixel. 1024x600 (600 Ki pixels): every third.
    for (w, h, speed) in [(300, 200, 1), (1024, 600, 3)] {
        let img = still(w, h);
        let pixels = Pixels::Still(DynamicImage::ImageRgb8(img.clone()));
        let out = encode::encode(&pixels, ImageFormat::Gif, None, Repeat::Infinite, false).unwrap();
        assert!(
            out.bytes == at_speed(&img, speed),
            "{w}x{h} at speed {speed}"
        );
        if speed > 1 {
            assert!(
                out.bytes != at_speed(&img, 1),
                "the speed shows in the output"
            );
        }
        let back = image::load_from_memory(&out.bytes).unwrap();
        assert_eq!(back.dimensions(), (w, h));
    }
}

#[test]
fn an_input_found_over_the_limit_while_read_has_no_made_up_size() {
    let limits = Limits {
        max_input_bytes: 1000,
        ..Default::default()
    };
    assert_eq!(
        ImagingError::input_too_large(5000, &limits).to_string(),
        "input is 5000 bytes, over the limit of 1000 bytes"
    );
    // Announced within the limit (or not at all: S3 without a length), and
    // found longer while read.
    assert_eq!(
        ImagingError::input_too_large(0, &limits).to_string(),
        "input is longer than the size it announced, over the limit of 1000 bytes"
    );
    assert_eq!(
        ImagingError::input_too_large(0, &limits).code(),
        "input_too_large"
    );
}

#[test]
fn a_text_watermark_marks_each_frame_of_an_animation_as_it_marks_a_still() {
    // The text is laid out once for all frames: each comes out as drawing
    // it on that frame alone does.
    let gif = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/images/ladybird-animated.gif"
    ))
    .unwrap();
    let action = Action::parse("watermark:t_aW1nZnVuYw,c_I2ZmMDAwMA,p_1,d_72").unwrap();
    let Some(crate::action::Op::Watermark(wm)) = action.ops.first() else {
        panic!("a text watermark");
    };
    let limits = Limits::default();
    let out = process(&gif, &action, &limits, &NoWatermarks)
        .unwrap()
        .image
        .unwrap();

    let decoded = decode::decode(&gif, &limits, Lead::Nothing).unwrap();
    let Pixels::Animated(frames) = decoded.pixels else {
        panic!("an animation");
    };
    assert!(frames.len() > 1);
    let marked: Vec<image::Frame> = frames
        .into_iter()
        .map(|frame| {
            let delay = frame.delay();
            let mut img = DynamicImage::ImageRgba8(frame.into_buffer());
            watermark::draw_text(&mut img, wm);
            image::Frame::from_parts(img.into_rgba8(), 0, 0, delay)
        })
        .collect();
    let expected = encode::encode(
        &Pixels::Animated(marked),
        ImageFormat::Gif,
        None,
        Repeat::Infinite,
        false,
    )
    .unwrap();
    assert!(
        out.bytes == expected.bytes,
        "frames differ from marking each alone"
    );
}

/// Two 8x8 frames, red then blue, with `repeat` as the GIF's loop extension
/// (none for `Finite(0)`) and, when `transparent`, each frame's left half
/// transparent (the second frame shows the first through its own).
fn two_frame_gif(repeat: gif::Repeat, transparent: bool) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let palette = [255, 0, 0, 0, 0, 255, 0, 0, 0];
        let mut encoder = gif::Encoder::new(&mut out, 8, 8, &palette).unwrap();
        encoder.set_repeat(repeat).unwrap();
        let half = |colour: u8| -> Vec<u8> {
            (0..64u8)
                .map(|i| if transparent && i % 8 < 4 { 2 } else { colour })
                .collect()
        };
        let red = gif::Frame {
            width: 8,
            height: 8,
            delay: 10,
            transparent: transparent.then_some(2),
            buffer: half(0).into(),
            ..Default::default()
        };
        encoder.write_frame(&red).unwrap();
        let blue = gif::Frame {
            width: 8,
            height: 8,
            delay: 10,
            transparent: transparent.then_some(2),
            buffer: half(1).into(),
            ..Default::default()
        };
        encoder.write_frame(&blue).unwrap();
    }
    out
}

fn gif_repeat_of(bytes: &[u8]) -> gif::Repeat {
    let mut decoder = gif::DecodeOptions::new().read_info(bytes).unwrap();
    decoder.next_frame_info().unwrap();
    decoder.repeat()
}

#[test]
fn an_animated_gif_plays_as_often_as_its_source_did() {
    for repeat in [
        gif::Repeat::Finite(0),
        gif::Repeat::Finite(3),
        gif::Repeat::Infinite,
    ] {
        let source = two_frame_gif(repeat, false);
        assert_eq!(gif_repeat_of(&source), repeat, "the fixture");
        let (out, _) = run_image(&source, "resize:w_4");
        assert_eq!(out.format, ImageFormat::Gif);
        let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&out.bytes))
            .unwrap()
            .into_frames()
            .count();
        assert_eq!(frames, 2, "{repeat:?}");
        assert_eq!(gif_repeat_of(&out.bytes), repeat);
    }
}

#[test]
fn info_gives_alpha_for_a_gif_only_when_a_pixel_is_transparent() {
    let alpha = |source: &[u8]| {
        let out = run(source, "info").unwrap();
        out.info.unwrap()["alpha"].clone()
    };
    assert_eq!(alpha(&two_frame_gif(gif::Repeat::Infinite, false)), false);
    assert_eq!(alpha(&two_frame_gif(gif::Repeat::Infinite, true)), true);
    // A one-frame GIF without transparency is an opaque still: as JPEG it
    // is not flattened, and `info` says no alpha.
    let mut still = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut still)
        .encode_frame(image::Frame::new(image::RgbaImage::from_pixel(
            6,
            6,
            Rgba([10, 200, 30, 255]),
        )))
        .unwrap();
    assert_eq!(alpha(&still), false);
    let decoded = decode(&still, &Limits::default(), Lead::Nothing).unwrap();
    let Pixels::Still(img) = decoded.pixels else {
        panic!("one frame is a still");
    };
    assert_eq!(img.color(), image::ColorType::Rgb8);
    assert_eq!(img.to_rgb8().get_pixel(3, 3).0, [10, 200, 30]);
}

#[test]
fn a_resized_gif_has_no_outline_of_stray_opaque_pixels() {
    // A red box on a clear ground, halved: the resize's ringing leaves alpha
    // of a few levels beside the box's edges, which a GIF would show as
    // opaque dots. Alpha is cut at half coverage instead.
    let mut img = RgbaImage::new(120, 80);
    for (x, y, p) in img.enumerate_pixels_mut() {
        if (10..=30).contains(&x) && (10..=40).contains(&y) {
            *p = Rgba([255, 0, 0, 255]);
        }
    }
    let mut source = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut source)
        .encode_frame(image::Frame::new(img))
        .unwrap();
    let (out, decoded) = run_image(&source, "resize:w_60");
    assert_eq!(out.format, ImageFormat::Gif);
    let rgba = decoded.to_rgba8();
    let mut opaque = 0;
    for (x, y, p) in rgba.enumerate_pixels() {
        // The box spans 5..15.5 x 5..20.5 at the new scale.
        let inside = (4..=16).contains(&x) && (4..=21).contains(&y);
        if p[3] > 0 {
            assert!(inside, "an opaque pixel at ({x}, {y}) outside the box");
            opaque += 1;
        }
    }
    assert!(opaque > 150, "the box itself, {opaque} pixels");
}

/// Frame count, delays in ms and plays (0: forever) of an animated WebP, read
/// by `image`'s decoder.
fn webp_animation_facts(bytes: &[u8]) -> (usize, Vec<u32>, u32) {
    let decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes)).unwrap();
    assert!(decoder.has_animation(), "an animated WebP");
    let plays = match decoder.loop_count() {
        image::metadata::LoopCount::Infinite => 0,
        image::metadata::LoopCount::Finite(n) => n.get(),
    };
    let delays: Vec<u32> = decoder
        .into_frames()
        .map(|f| {
            let (n, d) = f.unwrap().delay().numer_denom_ms();
            n / d
        })
        .collect();
    (delays.len(), delays, plays)
}

#[test]
fn an_animated_webp_stays_animated_with_its_delays_and_loop_count() {
    // Three frames of 100, 200 and 300 ms that play twice, made by Pillow.
    let source = fixture("three-frames.webp");
    let info = run(&source, "info").unwrap().info.unwrap();
    assert_eq!(info["frames"], 3);
    let (out, _) = run_image(&source, "resize:w_16");
    assert_eq!(out.format, ImageFormat::Webp);
    assert_eq!((out.width, out.height), (16, 12));
    assert_eq!(
        webp_animation_facts(&out.bytes),
        (3, vec![100, 200, 300], 2)
    );
    // Each frame is the source's frame, resized: the box moves right.
    let mut decoder = super::webp_anim::Decoder::new(&out.bytes).unwrap();
    let frames: Vec<image::Frame> = std::iter::from_fn(|| decoder.next_frame().unwrap()).collect();
    assert_eq!(frames.len(), 3);
    for (i, frame) in frames.iter().enumerate() {
        // The source's box spans x 4+8i..=11+8i: 2+4i..6+4i here.
        let x = 3 + 4 * i as u32;
        let shown = frame.buffer().get_pixel(x, 6);
        assert!(shown[3] > 200, "frame {i} at ({x}, 6): {shown:?}");
        if i > 0 {
            let gone = frame.buffer().get_pixel(x - 4, 6);
            assert!(
                gone[3] < 60,
                "frame {i}, the last box at ({}, 6): {gone:?}",
                x - 4
            );
        }
    }
    // Other formats take the first frame.
    let (png, first) = run_image(&source, "format:t_png");
    assert_eq!(png.format, ImageFormat::Png);
    assert_eq!(first.to_rgba8().get_pixel(6, 10).0, [255, 0, 0, 255]);
}

#[test]
fn an_animated_webp_is_turned_by_its_exif_orientation() {
    // The three-frame animation (32x24) with an EXIF chunk saying
    // orientation 6: turned a quarter clockwise, as a still WebP would be.
    let mut webp = fixture("three-frames.webp");
    let exif: [u8; 26] = [
        0x49, 0x49, 0x2a, 0x00, 0x08, 0x00, 0x00, 0x00, // TIFF header, IFD at 8
        0x01, 0x00, // one entry
        0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00,
        0x00, // Orientation 6
        0x00, 0x00, 0x00, 0x00, // no next IFD
    ];
    webp[20] |= 0x08; // VP8X: has EXIF
    webp.extend_from_slice(b"EXIF");
    webp.extend_from_slice(&(exif.len() as u32).to_le_bytes());
    webp.extend_from_slice(&exif);
    let riff = (webp.len() - 8) as u32;
    webp[4..8].copy_from_slice(&riff.to_le_bytes());

    let info = run(&webp, "info").unwrap().info.unwrap();
    assert_eq!(info["orientation"], 6);
    assert_eq!(info["frames"], 3);
    let (out, _) = run_image(&webp, "resize:w_12");
    assert_eq!(out.format, ImageFormat::Webp);
    assert_eq!((out.width, out.height), (12, 16), "turned, then resized");
    assert_eq!(webp_animation_facts(&out.bytes).0, 3);

    // Every frame is the source's frame turned a quarter clockwise (a
    // quarter the other way, or a transpose, has the same size): compared
    // with the source's frames turned by the image crate.
    let frames = |bytes: &[u8]| -> Vec<image::RgbaImage> {
        let mut decoder = super::webp_anim::Decoder::new(bytes).unwrap();
        std::iter::from_fn(|| decoder.next_frame().unwrap())
            .map(|f| f.into_buffer())
            .collect()
    };
    let (turned, _) = run_image(&webp, "format:t_webp,q_100");
    let source = frames(&fixture("three-frames.webp"));
    let got = frames(&turned.bytes);
    assert_eq!(got.len(), 3);
    for (i, (src, got)) in source.iter().zip(&got).enumerate() {
        let want = image::imageops::rotate90(src);
        assert_eq!(got.dimensions(), want.dimensions(), "frame {i}");
        let off = want
            .pixels()
            .zip(got.pixels())
            .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 48))
            .count();
        assert!(
            off < 20,
            "frame {i}: {off} pixels off the source turned clockwise"
        );
        let wrong_way = image::imageops::rotate270(src);
        let off_wrong = wrong_way
            .pixels()
            .zip(got.pixels())
            .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 48))
            .count();
        // A frame that looks the same both ways (the box in the middle)
        // cannot tell them apart.
        if image::imageops::rotate90(src) != wrong_way {
            assert!(off_wrong > off, "frame {i}: as close turned the other way");
        }
    }
}

#[test]
fn an_animated_gif_converts_to_an_animated_webp() {
    let gif = fixture("ladybird-animated.gif");
    let decoded = decode(&gif, &Limits::default(), Lead::Nothing).unwrap();
    let Pixels::Animated(frames) = decoded.pixels else {
        panic!("an animation");
    };
    let delays: Vec<u32> = frames
        .iter()
        .map(|f| {
            let (n, d) = f.delay().numer_denom_ms();
            n / d
        })
        .collect();
    let (out, _) = run_image(&gif, "resize:w_100|format:t_webp");
    let (count, webp_delays, plays) = webp_animation_facts(&out.bytes);
    assert_eq!(count, frames.len());
    assert_eq!(webp_delays, delays);
    // The GIF loops forever; so does the WebP.
    assert!(matches!(decoded.meta.repeat, Repeat::Infinite));
    assert_eq!(plays, 0);
}

#[test]
fn an_animated_webp_over_the_frame_limit_is_refused_from_its_header() {
    let limits = Limits {
        max_frames: 2,
        ..Limits::default()
    };
    let err = decode(&fixture("three-frames.webp"), &limits, Lead::Nothing)
        .err()
        .unwrap();
    assert_eq!(err.code(), "animation_too_large", "{err}");
    assert!(
        err.to_string()
            .starts_with("animation has 3 frames of 32x24"),
        "{err}"
    );
}

/// The `ExtraSamples` values of a TIFF's first image.
fn tiff_extra_samples(bytes: &[u8]) -> Option<Vec<u16>> {
    let mut decoder = tiff::decoder::Decoder::new(std::io::Cursor::new(bytes)).unwrap();
    decoder
        .find_tag_unsigned_vec::<u16>(tiff::tags::Tag::ExtraSamples)
        .unwrap()
}

#[test]
fn tiff_alpha_is_marked_on_output_and_unpremultiplied_on_input() {
    // Half-covered red: straight (255, 0, 0, 128), premultiplied (128, 0, 0, 128).
    let straight = RgbaImage::from_pixel(8, 8, Rgba([255, 0, 0, 128]));
    let (out, _) = run_image(&png(&DynamicImage::ImageRgba8(straight)), "format:t_tiff");
    assert_eq!(
        tiff_extra_samples(&out.bytes),
        Some(vec![2]),
        "unassociated alpha"
    );
    let (rgb, _) = run_image(&fixture("storm.jpg"), "resize:w_40|format:t_tiff");
    assert_eq!(tiff_extra_samples(&rgb.bytes), None, "no alpha, no tag");

    // A TIFF whose alpha is associated: its colours are divided back.
    let mut premultiplied = Vec::new();
    {
        use tiff::encoder::{TiffEncoder, colortype};
        let mut tiff = TiffEncoder::new(std::io::Cursor::new(&mut premultiplied)).unwrap();
        let mut image = tiff.new_image::<colortype::RGBA8>(8, 8).unwrap();
        image
            .encoder()
            .write_tag(tiff::tags::Tag::ExtraSamples, 1u16)
            .unwrap();
        image.write_data(&[128u8, 0, 0, 128].repeat(64)).unwrap();
    }
    let (_, back) = run_image(&premultiplied, "format:t_png");
    assert_eq!(back.to_rgba8().get_pixel(3, 3).0, [255, 0, 0, 128]);
}

#[test]
fn a_bigtiff_is_read_as_a_tiff() {
    let mut big = Vec::new();
    {
        use tiff::encoder::{TiffEncoder, colortype};
        let mut tiff = TiffEncoder::new_big(std::io::Cursor::new(&mut big)).unwrap();
        tiff.write_image::<colortype::RGB8>(6, 4, &[10u8, 200, 30].repeat(24))
            .unwrap();
    }
    assert_eq!(&big[..4], b"II\x2b\x00");
    let info = run(&big, "info").unwrap().info.unwrap();
    assert_eq!(info["type"], "tiff");
    let (_, img) = run_image(&big, "format:t_png");
    assert_eq!(img.dimensions(), (6, 4));
    assert_eq!(rgb_at(&img, 2, 2), [10, 200, 30]);
}

#[test]
fn an_animated_png_gives_its_first_frame_and_info_counts_its_frames() {
    let mut apng = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut apng, 4, 4);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_animated(3, 0).unwrap();
        let mut writer = encoder.write_header().unwrap();
        for colour in [[255u8, 0, 0], [0, 255, 0], [0, 0, 255]] {
            writer.write_image_data(&colour.repeat(16)).unwrap();
        }
        writer.finish().unwrap();
    }
    let info = run(&apng, "info").unwrap().info.unwrap();
    assert_eq!(info["frames"], 3);
    let (out, img) = run_image(&apng, "resize:w_2");
    assert_eq!(out.format, ImageFormat::Png);
    assert_eq!(rgb_at(&img, 1, 1), [255, 0, 0]);
}

#[test]
fn an_animated_webp_claiming_a_huge_canvas_is_refused_from_its_header() {
    // The fixture with its VP8X canvas set to 16384 x 16384 (stored less one).
    let mut webp = fixture("three-frames.webp");
    assert_eq!(&webp[12..16], b"VP8X");
    webp[24..30].copy_from_slice(&[0xff, 0x3f, 0x00, 0xff, 0x3f, 0x00]);
    let err = decode(&webp, &Limits::default(), Lead::Nothing)
        .err()
        .unwrap();
    assert_eq!(err.code(), "too_many_pixels", "{err}");
}

#[test]
fn a_grey_picture_is_written_with_one_channel_and_a_coloured_one_with_three() {
    let grey = fixture("storm-gray.jpg");
    for (format, want) in [
        ("jpeg", image::ColorType::L8),
        ("png", image::ColorType::L8),
        ("tiff", image::ColorType::L8),
        // WebP and GIF have no grey form; BMP is left as it was.
        ("webp", image::ColorType::Rgb8),
    ] {
        let (encoded, out) = run_image(&grey, &format!("resize:w_120|format:t_{format}"));
        assert_eq!(out.color(), want, "{format}");
        assert_eq!((encoded.width, encoded.height), (120, 80), "{format}");
    }
    // The same picture as the RGB path makes it, a third of the size as PNG.
    let (rgb_png, rgb) = run_image(&fixture("storm.jpg"), "resize:w_120|format:t_png");
    let (grey_png, one) = run_image(&grey, "resize:w_120|format:t_png");
    assert_eq!(rgb.color(), image::ColorType::Rgb8);
    let luma = DynamicImage::ImageLuma8(rgb.to_luma8());
    assert!(mean_abs_diff(&luma, &one) < 12.0);
    assert!(grey_png.bytes.len() * 2 < rgb_png.bytes.len());
    // Colour added to a grey picture (red text) keeps three channels.
    let (_, marked) = run_image(
        &grey,
        "resize:w_300|watermark:t_5rC05Y2w5paH5a2X,c_I2ZmMDAwMA,p_1|format:t_jpeg",
    );
    assert_eq!(marked.color(), image::ColorType::Rgb8);
    // Grey with alpha keeps its alpha, as grey and alpha.
    let mut with_alpha = image::GrayAlphaImage::from_pixel(40, 30, image::LumaA([90, 255]));
    with_alpha.put_pixel(3, 4, image::LumaA([200, 0]));
    let (_, out) = run_image(&png(&DynamicImage::ImageLumaA8(with_alpha)), "format:t_png");
    assert_eq!(out.color(), image::ColorType::La8);
    assert_eq!(out.get_pixel(3, 4)[3], 0);
    assert_eq!(out.get_pixel(0, 0), Rgba([90, 90, 90, 255]));
    // An RGB source stays RGB, however grey its pixels.
    let flat = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        40,
        30,
        Rgb([90, 90, 90]),
    )));
    for format in ["png", "jpeg", "tiff"] {
        let (_, out) = run_image(&flat, &format!("format:t_{format}"));
        assert_eq!(out.color(), image::ColorType::Rgb8, "{format}");
    }
}

#[test]
fn an_opaque_animation_pads_white_and_a_transparent_one_clear() {
    for (transparent, pad) in [(false, [255u8; 4]), (true, [0u8; 4])] {
        let gif = two_frame_gif(gif::Repeat::Infinite, transparent);
        let out = run(&gif, "resize:w_16,h_8").unwrap();
        let bytes = out.image.unwrap().bytes;
        let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(bytes))
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap();
        assert_eq!(frames.len(), 2);
        for frame in &frames {
            let buffer = frame.buffer();
            assert_eq!(buffer.dimensions(), (16, 8));
            assert_eq!(buffer.get_pixel(0, 0).0, pad, "transparent {transparent}");
            assert_eq!(buffer.get_pixel(15, 7).0, pad, "transparent {transparent}");
        }
        let info = run(&gif, "resize:w_16,h_8|info").unwrap().info.unwrap();
        assert_eq!(info["alpha"], transparent);
    }
}

/// The first frame of a GIF against the same pipeline's first frame
/// before quantisation (a PNG keeps only the first frame).
fn gif_first_frame_and_unquantised(
    input: &[u8],
    action: &str,
    resolver: &dyn WatermarkResolver,
) -> (DynamicImage, DynamicImage) {
    let run = |action: &str| {
        let parsed = Action::parse(action).unwrap();
        let out = process(input, &parsed, &Limits::default(), resolver).unwrap();
        image::load_from_memory(&out.image.unwrap().bytes).unwrap()
    };
    let gif = run(action);
    let unquantised = run(&format!("{action}|format:t_png"));
    (
        DynamicImage::ImageRgb8(gif.to_rgb8()),
        DynamicImage::ImageRgb8(unquantised.to_rgb8()),
    )
}

#[test]
fn gif_palettes_keep_small_areas_of_colour() {
    let input = fixture("ladybird-animated.gif");
    // NeuQuant sampling every 10th pixel gave 38.7 dB here; every pixel 42.6.
    let (gif, exact) = gif_first_frame_and_unquantised(&input, "resize:w_320", &NoWatermarks);
    let db = psnr(&gif, &exact);
    assert!(db > 41.0, "{db:.2} dB");
    // A logo's pure red came out as (187, 29, 2) with the sparser sampling.
    let mark = "watermark_image:u_czM6Ly9tYXJrcy9yZWQtYmx1ZS5wbmc,l_10,t_10,p_1";
    let (gif, exact) = gif_first_frame_and_unquantised(&input, mark, &FixtureResolver);
    assert_eq!(exact.get_pixel(12, 12).0, [255, 0, 0, 255]);
    let red = gif.get_pixel(12, 12).0;
    let off = (0..3)
        .map(|c| red[c].abs_diff(exact.get_pixel(12, 12).0[c]))
        .max();
    assert!(off <= Some(8), "{red:?}");
}

#[test]
fn an_animation_saved_as_a_still_keeps_alpha_when_a_later_frame_is_clear() {
    // The first frame opaque, the second half clear: the still is the
    // first frame, with the alpha channel `info` reports.
    let mut gif = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
        let opaque = RgbaImage::from_pixel(8, 8, Rgba([255, 0, 0, 255]));
        let clear = RgbaImage::from_fn(8, 8, |x, _| Rgba([0, 0, 255, if x < 4 { 0 } else { 255 }]));
        for buffer in [opaque, clear] {
            enc.encode_frame(image::Frame::new(buffer)).unwrap();
        }
    }
    let out = run(&gif, "format:t_png").unwrap();
    let decoded = image::load_from_memory(&out.image.unwrap().bytes).unwrap();
    assert_eq!(decoded.color(), image::ColorType::Rgba8);
    assert_eq!(decoded.get_pixel(0, 0).0, [255, 0, 0, 255]);
    let info = run(&gif, "format:t_png|info").unwrap().info.unwrap();
    assert_eq!(info["alpha"], true);
}

#[test]
fn an_animation_saved_as_a_still_has_alpha_only_when_its_first_frame_needs_it() {
    for (transparent, colour) in [
        (false, image::ColorType::Rgb8),
        (true, image::ColorType::Rgba8),
    ] {
        let gif = two_frame_gif(gif::Repeat::Infinite, transparent);
        for format in ["png", "tiff"] {
            let out = run(&gif, &format!("resize:w_16,h_8|format:t_{format}")).unwrap();
            let decoded = image::load_from_memory(&out.image.unwrap().bytes).unwrap();
            assert_eq!(
                decoded.color(),
                colour,
                "{format}, transparent {transparent}"
            );
            assert_eq!(decoded.dimensions(), (16, 8));
        }
    }
}

#[test]
fn tiff_output_is_deflate_compressed_with_its_predictor_and_lossless() {
    let photo = fixture("wood.jpg");
    let (out, decoded) = run_image(&photo, "format:t_tiff");
    let mut decoder = tiff::decoder::Decoder::new(std::io::Cursor::new(&out.bytes)).unwrap();
    let tag = |decoder: &mut tiff::decoder::Decoder<_>, tag| {
        decoder.find_tag_unsigned::<u16>(tag).unwrap()
    };
    // Adobe Deflate (8) and the horizontal predictor (2): the predictor tag
    // the encoder always writes is one readers know only with a codec.
    assert_eq!(tag(&mut decoder, tiff::tags::Tag::Compression), Some(8));
    assert_eq!(tag(&mut decoder, tiff::tags::Tag::Predictor), Some(2));
    let raw = decoded.width() as usize * decoded.height() as usize * 3;
    assert!(
        out.bytes.len() < raw * 3 / 4,
        "{} of {raw}",
        out.bytes.len()
    );
    // Lossless: the same pixels as a PNG of the same pipeline.
    let (_, png) = run_image(&photo, "format:t_png");
    assert_eq!(decoded.to_rgb8(), png.to_rgb8());
}

#[test]
fn a_progressive_jpeg_with_too_many_scans_is_refused() {
    // wood.jpg (progressive) with its last scan repeated 150 times: every
    // scan is a pass over the coefficients, so a small file of many scans
    // could take minutes.
    let photo = fixture("wood.jpg");
    let last_scan = photo.windows(2).rposition(|w| w == [0xff, 0xda]).unwrap();
    let end = photo.len() - 2;
    assert_eq!(&photo[end..], [0xff, 0xd9]);
    let mut bomb = photo[..end].to_vec();
    for _ in 0..150 {
        bomb.extend_from_slice(&photo[last_scan..end]);
    }
    bomb.extend_from_slice(&[0xff, 0xd9]);
    for action in ["resize:w_200", "crop:w_50,h_50", "format:t_png", "info"] {
        let e = run(&bomb, action).unwrap_err().to_string();
        assert!(e.contains("more than 100 scans"), "{action}: {e}");
    }
    // The file itself decodes.
    assert!(run(&photo, "format:t_png").is_ok());
}

#[test]
fn decoder_messages_are_bounded_and_say_when_a_file_is_cut_short() {
    // The decoder lists every one of 65535 declared samples.
    let e = run(&fixture("spp-65535.tif"), "resize:w_10").unwrap_err();
    assert_eq!(e.code(), "decode_failed");
    let message = e.to_string();
    assert!(
        message.len() < 500,
        "{} bytes: {message:.200}",
        message.len()
    );
    assert!(message.contains("bytes)"), "{message}");
    // The decoder's bare "Memory limit exceeded" says what was asked for.
    let e = run(&fixture("bogus-bytecount.tif"), "resize:w_10").unwrap_err();
    assert!(
        e.to_string()
            .contains("decoding its 100x100 pixels as stored (Rgb8) would take more memory"),
        "{e}"
    );
    // A BMP cut in half: std's words for a short read, said plainly.
    let mut bmp = std::io::Cursor::new(Vec::new());
    image::load_from_memory(&fixture("storm.jpg"))
        .unwrap()
        .write_to(&mut bmp, image::ImageFormat::Bmp)
        .unwrap();
    let bmp = bmp.into_inner();
    let e = run(&bmp[..bmp.len() / 2], "resize:w_10").unwrap_err();
    assert!(e.to_string().contains("the file ends early"), "{e}");
}

#[test]
fn the_operations_of_one_action_make_at_most_four_times_the_pixel_limit() {
    let dot = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
        1,
        1,
        Rgb([9, 9, 9]),
    )));
    let limits = Limits {
        max_pixels: 1_000_000,
        max_animation_pixels: 1_000_000,
        ..Limits::default()
    };
    let run = |action: &str| {
        process(
            &dot,
            &Action::parse(action).unwrap(),
            &limits,
            &NoWatermarks,
        )
    };
    // Each resize is within the output limits; together they are not.
    let ops: Vec<&str> = (0..6)
        .map(|n| {
            if n % 2 == 0 {
                "resize:w_1000,h_1000,m_1"
            } else {
                "resize:w_990,h_990,m_1"
            }
        })
        .collect();
    let e = run(&ops.join("|")).unwrap_err();
    assert_eq!(e.code(), "output_too_large");
    assert!(
        e.to_string()
            .contains("over the limit of 4000000 pixels made by the whole action"),
        "{e}"
    );
    // Four such steps are within it.
    let out = run(&ops[..4].join("|")).unwrap().image.unwrap();
    assert_eq!((out.width, out.height), (990, 990));
    // A crop of the whole image and `rotate:a_0` make nothing, and do not
    // count; `rotate:a_180` makes a new image of the same size, and does.
    let kept = format!("{}|crop:w_5000,h_5000|rotate:a_0", ops[..4].join("|"));
    assert!(run(&kept).is_ok());
    let turned = format!("{}|rotate:a_180", ops[..4].join("|"));
    assert_eq!(run(&turned).unwrap_err().code(), "output_too_large");
}

#[test]
fn info_gives_exif_values_as_stored() {
    use exif::{Field, In, Rational, Tag, Value};
    let field = |tag, value| Field {
        tag,
        ifd_num: In::PRIMARY,
        value,
    };
    let ratios = |parts: &[(u32, u32)]| {
        Value::Rational(
            parts
                .iter()
                .map(|&(num, denom)| Rational { num, denom })
                .collect(),
        )
    };
    let fields = [
        field(Tag::Make, Value::Ascii(vec![b"Caf\xc3\xa9 \"Q\"".to_vec()])),
        field(
            Tag::DateTimeOriginal,
            Value::Ascii(vec![b"2021:07:04 10:20:30".to_vec()]),
        ),
        field(Tag::ExifVersion, Value::Undefined(b"0232".to_vec(), 0)),
        field(Tag::FocalLength, ratios(&[(54, 10)])),
        field(Tag::GPSLatitudeRef, Value::Ascii(vec![b"N".to_vec()])),
        field(Tag::GPSLatitude, ratios(&[(39, 1), (54, 1), (234, 10)])),
        field(Tag::GPSLongitude, ratios(&[(116, 1), (23, 1), (0, 0)])),
        field(Tag::GPSAltitudeRef, Value::Byte(vec![1])),
        field(Tag::GPSAltitude, ratios(&[(1234, 10)])),
    ];
    let mut writer = exif::experimental::Writer::new();
    for f in &fields {
        writer.push_field(f);
    }
    let mut tiff = std::io::Cursor::new(Vec::new());
    writer.write(&mut tiff, false).unwrap();
    let tiff = tiff.into_inner();
    // The EXIF segment first, right after the JPEG's start.
    let jpeg = fixture("storm-3x1.jpg");
    let mut marked = jpeg[..2].to_vec();
    marked.extend([0xFF, 0xE1]);
    marked.extend(u16::try_from(tiff.len() + 8).unwrap().to_be_bytes());
    marked.extend(b"Exif\0\0");
    marked.extend(&tiff);
    marked.extend(&jpeg[2..]);
    let info = run(&marked, "info").unwrap().info.unwrap();
    assert_eq!(info["make"], "Café \"Q\"");
    assert_eq!(info["datetime"], "2021:07:04 10:20:30");
    assert_eq!(info["exifversion"], "0232");
    assert_eq!(info["focallength"], "5.4");
    assert_eq!(info["gpslatituderef"], "N");
    assert_eq!(info["gpslatitude"], "39.9065");
    // A rational of 0/0 is no value: the longitude is left out.
    assert!(info.get("gpslongitude").is_none(), "{info}");
    assert_eq!(info["gpsaltitude"], "123.4");
    assert_eq!(info["gpsaltituderef"], "below sea level");
}
