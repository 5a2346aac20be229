use std::fmt::{self, Write as _};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{Action, CropAnchor, Op};

pub(super) fn write_action(action: &Action, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, op) in action.ops.iter().enumerate() {
        if i > 0 {
            f.write_char('|')?;
        }
        write_op(op, f)?;
    }
    Ok(())
}

/// Writes `name:k_v,...` with every parameter explicit, in a fixed order.
fn write_op(op: &Op, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(op.name())?;
    let mut params: Vec<(&str, String)> = Vec::new();
    match op {
        Op::Info => {}
        Op::Crop(c) => {
            push_opt(&mut params, "w", c.width);
            push_opt(&mut params, "h", c.height);
            match c.anchor {
                CropAnchor::Gravity(g) => params.push(("g", g.number().to_string())),
                CropAnchor::Offset { left, top } => {
                    params.push(("l", left.to_string()));
                    params.push(("t", top.to_string()));
                }
            }
        }
        Op::Rotate(r) => params.push(("a", r.degrees().to_string())),
        Op::Resize(r) => {
            push_opt(&mut params, "w", r.width);
            push_opt(&mut params, "h", r.height);
            params.push(("m", (r.mode as u32).to_string()));
        }
        Op::Watermark(w) => {
            params.push(("t", URL_SAFE_NO_PAD.encode(&w.text)));
            params.push(("p", w.opacity.get().to_string()));
            params.push(("d", w.dpi.to_string()));
            params.push(("c", URL_SAFE_NO_PAD.encode(w.color.to_string())));
        }
        Op::WatermarkImage(w) => {
            params.push(("u", URL_SAFE_NO_PAD.encode(&w.url)));
            params.push(("l", w.left.to_string()));
            params.push(("t", w.top.to_string()));
            params.push(("p", w.opacity.get().to_string()));
        }
        Op::Format(fmt) => {
            params.push(("t", fmt.kind.name().to_string()));
            push_opt(&mut params, "q", fmt.quality);
        }
        Op::Save(s) => {
            params.push(("b", s.bucket.clone()));
            params.push(("k", s.key.clone()));
        }
    }
    for (i, (k, v)) in params.iter().enumerate() {
        f.write_char(if i == 0 { ':' } else { ',' })?;
        write!(f, "{k}_{v}")?;
    }
    Ok(())
}

fn push_opt<T: ToString>(
    params: &mut Vec<(&'static str, String)>,
    key: &'static str,
    v: Option<T>,
) {
    if let Some(v) = v {
        params.push((key, v.to_string()));
    }
}
