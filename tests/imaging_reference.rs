//! Our resize and crop against outputs made once with libvips
//! (`fixtures/reference/README.md` has the commands): PSNR >= 35 dB.

use std::path::{Path, PathBuf};

use imgfunc::action::Action;
use imgfunc::imaging::{self, Limits, NoWatermarks};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference")
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[test]
fn resize_and_crop_match_libvips() {
    let cases: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 15);
    let mut report = Vec::new();
    let mut failed = false;
    for case in &cases {
        let action = case["action"].as_str().unwrap();
        let input = std::fs::read(dir().join(case["input"].as_str().unwrap())).unwrap();
        let expected = image::open(dir().join(case["expected"].as_str().unwrap())).unwrap();
        let out = imaging::process(
            &input,
            &Action::parse(&format!("{action}|format:t_png")).unwrap(),
            &Limits::default(),
            &NoWatermarks,
        )
        .unwrap();
        let ours = image::load_from_memory(&out.image.unwrap().bytes).unwrap();
        assert_eq!(
            (ours.width(), ours.height()),
            (expected.width(), expected.height()),
            "{action}"
        );
        assert_eq!(
            ours.color().has_alpha(),
            expected.color().has_alpha(),
            "{action}"
        );
        let db = if expected.color().has_alpha() {
            psnr(ours.to_rgba8().as_raw(), expected.to_rgba8().as_raw())
        } else {
            psnr(ours.to_rgb8().as_raw(), expected.to_rgb8().as_raw())
        };
        failed |= db < 35.0;
        report.push(format!("{action}: {db:.1} dB"));
    }
    println!("{}", report.join("\n"));
    assert!(!failed, "below 35 dB:\n{}", report.join("\n"));
}
