//! Runs every pipeline case in `fixtures/process/` (see its README).

use std::path::{Path, PathBuf};

use imgfunc::action::Action;
use imgfunc::imaging::{self, Limits, NoWatermarks, Pixels};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn run_case(name: &str, case: &Value) -> Result<(), String> {
    let input_path = root()
        .join("images")
        .join(case["input"].as_str().ok_or("no input")?);
    let input = std::fs::read(&input_path).map_err(|e| format!("{}: {e}", input_path.display()))?;
    let action_str = case["action"].as_str().ok_or("no action")?;
    let result = Action::parse(action_str)
        .map_err(|e| e.to_string())
        .and_then(|action| {
            imaging::process(&input, &action, &Limits::default(), &NoWatermarks)
                .map_err(|e| e.to_string())
        });
    if let Some(expected) = case["error"].as_str() {
        return match result {
            Err(msg) if msg.contains(expected) => Ok(()),
            Err(msg) => Err(format!("error `{msg}` lacks `{expected}`")),
            Ok(_) => Err(format!("succeeded, expected an error with `{expected}`")),
        };
    }
    let out = result?;
    if let Some(info) = case["info"].as_object() {
        let got = out.info.ok_or("no info")?;
        for (k, v) in info {
            if &got[k] != v {
                return Err(format!("info.{k} is {}, expected {v}", got[k]));
            }
        }
        return Ok(());
    }
    let img = out.image.ok_or("no image")?;
    let expect_u32 = |k: &str| case[k].as_u64().map(|v| v as u32);
    if let Some(f) = case["format"].as_str()
        && img.format.name() != f
    {
        return Err(format!("format {}, expected {f}", img.format.name()));
    }
    let decoded = imaging::decode(&img.bytes, &Limits::default(), imaging::Lead::Nothing)
        .map_err(|e| e.to_string())?;
    let (w, h) = decoded.pixels.dimensions();
    if (Some(w), Some(h)) != (expect_u32("width"), expect_u32("height")) {
        return Err(format!(
            "size {w}x{h}, expected {}x{}",
            case["width"], case["height"]
        ));
    }
    if let Some(frames) = case["frames"].as_u64() {
        let got = match &decoded.pixels {
            Pixels::Animated(f) => f.len() as u64,
            Pixels::Still(_) => 1,
        };
        if got != frames {
            return Err(format!("{got} frames, expected {frames}"));
        }
    }
    let first = decoded.pixels.into_first_frame().to_rgba8();
    for sample in case["pixels"].as_array().into_iter().flatten() {
        let (x, y) = (
            sample["x"].as_u64().unwrap_or(0) as u32,
            sample["y"].as_u64().unwrap_or(0) as u32,
        );
        let tol = sample["tolerance"].as_u64().unwrap_or(0) as u8;
        let want: Vec<u8> = sample
            .get("rgba")
            .or_else(|| sample.get("rgb"))
            .and_then(Value::as_array)
            .ok_or("sample without rgb/rgba")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as u8)
            .collect();
        let got = first.get_pixel(x, y);
        if want.iter().zip(got.0).any(|(a, b)| a.abs_diff(b) > tol) {
            return Err(format!(
                "pixel ({x},{y}) is {:?}, expected {want:?} ±{tol}",
                got.0
            ));
        }
    }
    let _ = name;
    Ok(())
}

#[test]
fn every_fixture_case_passes() {
    let mut failures = Vec::new();
    let mut count = 0;
    let mut entries: Vec<_> = std::fs::read_dir(root().join("process"))
        .expect("fixtures/process")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let case: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        count += 1;
        if let Err(e) = run_case(&name, &case) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(count >= 10, "only {count} cases found");
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}
