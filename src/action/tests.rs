use proptest::prelude::*;

use super::*;

fn err(input: &str) -> String {
    Action::parse(input).unwrap_err().to_string()
}

#[test]
fn parses_the_readme_pipeline() {
    let a = Action::parse("crop:w_300|rotate:a_90|resize:h_200|format:t_png").unwrap();
    assert_eq!(
        a.ops,
        vec![
            Op::Crop(Crop {
                width: Some(300),
                height: None,
                anchor: CropAnchor::Gravity(Gravity::Center)
            }),
            Op::Rotate(Rotation::R90),
            Op::Resize(Resize {
                width: None,
                height: Some(200),
                mode: ResizeMode::Pad
            }),
            Op::Format(Format {
                kind: FormatKind::Png,
                quality: None
            }),
        ]
    );
    assert_eq!(
        a.to_string(),
        "crop:w_300,g_0|rotate:a_90|resize:h_200,m_0|format:t_png"
    );
}

#[test]
fn the_number_of_operations_is_bounded() {
    let ok = vec!["rotate:a_90"; parse::MAX_OPERATIONS].join("|");
    assert_eq!(Action::parse(&ok).unwrap().ops.len(), parse::MAX_OPERATIONS);
    let over = vec!["rotate:a_90"; parse::MAX_OPERATIONS + 1].join("|");
    assert_eq!(
        err(&over),
        "too many operations: at most 32 per action, got 33"
    );
    // A rule body may be 2 MiB: refused before any operation is parsed.
    let huge = vec!["rotate:a_90"; 100_000].join("|");
    assert!(err(&huge).ends_with("got 100000"));

    let mark = "watermark_image:u_czM6Ly9tL2EucG5n";
    let four = [mark; parse::MAX_WATERMARK_IMAGES].join("|");
    assert!(Action::parse(&four).is_ok());
    let five = [mark; parse::MAX_WATERMARK_IMAGES + 1].join("|");
    assert_eq!(
        err(&five),
        "too many operations: at most 4 watermark_image operations per action, got 5"
    );

    let save = |n: usize| format!("save:b_out,k_{n}.jpg");
    let four = (0..parse::MAX_SAVES)
        .map(save)
        .collect::<Vec<_>>()
        .join("|");
    assert!(Action::parse(&format!("resize:w_10|{four}")).is_ok());
    let five = (0..=parse::MAX_SAVES)
        .map(save)
        .collect::<Vec<_>>()
        .join("|");
    assert_eq!(
        err(&five),
        "too many operations: at most 4 save operations per action, got 5"
    );
}

#[test]
fn rotate_error_names_op_key_value_and_allowed() {
    assert_eq!(
        err("rotate:a_45"),
        "rotate: a must be one of 0, 90, 180, 270, got 45"
    );
}

#[test]
fn numbers_are_decimal_digits_only() {
    for action in [
        "resize:w_+100",
        "resize:w_-1",
        "resize:w_1e2",
        "resize:w_0x10",
        "rotate:a_+90",
        "resize:w_10,m_+1",
        "crop:w_+10",
    ] {
        assert!(Action::parse(action).is_err(), "{action}");
    }
    // Leading zeros are still the number.
    assert_eq!(
        Action::parse("resize:w_0100").unwrap(),
        Action::parse("resize:w_100").unwrap()
    );
}

#[test]
fn unknown_operations_and_keys_are_errors() {
    assert!(err("blur:r_3").contains("unknown operation `blur`"));
    assert!(err("resize:w_10,x_3").contains("resize: unknown key `x`"));
    assert!(err("resize:w_10,w_20").contains("given twice"));
    assert!(err("resize:w10").contains("not of the form key_value"));
    assert!(err("resize:m_1").contains("missing required key"));
    assert!(err("resize:w_0").contains("resize: w must be an integer from 1"));
    assert!(
        err("format:t_gif").contains("format: t must be one of jpeg, png, webp, tiff, got gif")
    );
    assert!(err("format:t_jpeg,q_101").contains("q must be an integer from 1 to 100"));
    assert!(err("crop:g_1,l_3").contains("crop: g_1 cannot be combined with l_3;"));
    assert!(err("crop:l_0,g_2,t_4").contains("g_2 cannot be combined with l_0,t_4;"));
    assert!(err("crop:g_10").contains("crop: g must be an integer from 0 to 9, got 10"));
    assert!(err("watermark:p_0.5").contains("missing required key `t`"));
    assert!(err("watermark:t_!!!").contains("watermark: t must be non-empty UTF-8 text"));
    assert!(err("watermark:t_YQ,p_0").contains("watermark: p must be a number above 0"));
    use base64::Engine as _;
    let long = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("水".repeat(1001));
    let e = err(&format!("watermark:t_{long}"));
    assert!(
        e.contains("t must be text of at most 1000 characters, got"),
        "{e}"
    );
    assert!(e.contains("(1001 characters)") && e.len() < 200, "{e}");
    let fits = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("水".repeat(1000));
    assert!(Action::parse(&format!("watermark:t_{fits}")).is_ok());
    // Past f32's range is still a number above 1.
    assert!(Action::parse(&format!("watermark_image:u_YQ,p_{}", "9".repeat(60))).is_ok());
    // Decimal digits with one point at most: no sign, exponent or bare point.
    for p in [".5", "0.5", "1.", "1"] {
        assert!(
            Action::parse(&format!("watermark_image:u_YQ,p_{p}")).is_ok(),
            "{p}"
        );
    }
    for p in [
        "inf", "-inf", "infinity", "NaN", "+0.5", "5e-1", "1e39", ".", "1.2.3",
    ] {
        let e = err(&format!("watermark_image:u_YQ,p_{p}"));
        assert!(
            e.contains(&format!(
                "p must be a number above 0 (values above 1 mean 1), got {p}"
            )),
            "{e}"
        );
    }
    assert!(err("").contains("empty"));
    assert!(err("info||info").contains("position 2"));
    assert!(err("|info").contains("position 1: a leading or trailing `|`"));
    assert!(
        err("resize:w_").contains("resize: w must be an integer from 1 to 1048576, got nothing")
    );
    // QingStor: an empty crop key, or watermark_image offset, is its
    // default.
    for (empty, plain) in [
        ("crop:w_,h_100", "crop:h_100"),
        ("crop:l_,t_100", "crop:t_100"),
        ("crop:g_,w_100", "crop:w_100"),
        (
            "watermark_image:u_YS5wbmc,l_,t_5",
            "watermark_image:u_YS5wbmc,t_5",
        ),
    ] {
        assert_eq!(
            Action::parse(empty).unwrap(),
            Action::parse(plain).unwrap(),
            "{empty}"
        );
    }
    // Every crop key empty: the whole image, centred.
    let Op::Crop(all) = &Action::parse("crop:g_,l_,t_,w_,h_").unwrap().ops[0] else {
        panic!("not a crop")
    };
    assert_eq!((all.width, all.height), (None, None));
    assert_eq!(all.anchor, CropAnchor::Gravity(Gravity::Center));
    assert!(err("info:x_1").contains("info: unknown key"));
}

#[test]
fn opacity_above_one_is_clamped() {
    let a = Action::parse("watermark:t_5rC05Y2w5paH5a2X,p_3").unwrap();
    let Op::Watermark(w) = &a.ops[0] else {
        panic!("not a watermark")
    };
    assert_eq!(w.opacity.get(), 1.0);
    assert_eq!(w.text, "水印文字");
    assert_eq!(w.dpi, 150);
    assert!((w.em_px() - 20.833).abs() < 0.01);
}

#[test]
fn base64_accepts_both_alphabets_with_or_without_padding() {
    // "a?b>" encodes to "YT9iPg==" (standard) which has no +/; use bytes that do.
    let text = "ü?>~";
    for encoded in ["w7w/Pn4=", "w7w/Pn4", "w7w_Pn4=", "w7w_Pn4"] {
        let a = Action::parse(&format!("watermark:t_{encoded}")).unwrap();
        let Op::Watermark(w) = &a.ops[0] else {
            panic!()
        };
        assert_eq!(w.text, text, "{encoded}");
    }
    let a = Action::parse("watermark:t_YQ,c_I2ZmMDAwMA").unwrap();
    let Op::Watermark(w) = &a.ops[0] else {
        panic!()
    };
    assert_eq!(w.color, Color { r: 255, g: 0, b: 0 });
    // Unused low bits set in the last character ("YR" for "YQ").
    let a = Action::parse("watermark:t_YR").unwrap();
    let Op::Watermark(w) = &a.ops[0] else {
        panic!()
    };
    assert_eq!(w.text, "a");
}

#[test]
fn spaces_around_keys_and_values_are_ignored() {
    let plain = Action::parse("resize:w_100,h_50|watermark:t_YQ").unwrap();
    for spaced in [
        "resize: w _100 , h_ 50 | watermark: t _ YQ",
        " resize:w _ 100,h _50|watermark:t_ YQ ",
    ] {
        assert_eq!(Action::parse(spaced).unwrap(), plain, "{spaced}");
    }
    // Inside a key or a number a space is still an error.
    assert!(err("resize:w w_100").contains("unknown key"));
    assert!(err("resize:w_1 00").contains("w must be"));
}

#[test]
fn defaults_and_quality() {
    let a = Action::parse("format:t_webp").unwrap();
    assert_eq!(a.output_format().unwrap().effective_quality(), 80);
    let a = Action::parse("format:t_jpg").unwrap();
    assert_eq!(a.output_format().unwrap().effective_quality(), 75);
    assert_eq!(a.output_format().unwrap().kind, FormatKind::Jpeg);
    let a = Action::parse("crop:l_10").unwrap();
    assert_eq!(
        a.ops[0],
        Op::Crop(Crop {
            width: None,
            height: None,
            anchor: CropAnchor::Offset { left: 10, top: 0 }
        })
    );
    let a = Action::parse("save:b_out,k_a/b_c.jpg").unwrap();
    assert_eq!(
        a.ops[0],
        Op::Save(Save {
            bucket: "out".into(),
            key: "a/b_c.jpg".into()
        })
    );
}

fn arb_opacity() -> impl Strategy<Value = Opacity> {
    (1u32..=1000).prop_map(|n| Opacity::new(n as f32 / 1000.0).unwrap())
}

fn arb_side() -> impl Strategy<Value = Option<u32>> {
    prop::option::of(1u32..=20000)
}

fn arb_op() -> impl Strategy<Value = Op> {
    let name = "[a-zA-Z0-9/._-]{1,20}";
    prop_oneof![
        Just(Op::Info),
        (arb_side(), arb_side(), 0u32..=9).prop_map(|(w, h, g)| Op::Crop(Crop {
            width: w,
            height: h,
            anchor: CropAnchor::Gravity(Gravity::from_number(g).unwrap())
        })),
        (arb_side(), arb_side(), 0u32..5000, 0u32..5000).prop_map(|(w, h, l, t)| Op::Crop(Crop {
            width: w,
            height: h,
            anchor: CropAnchor::Offset { left: l, top: t }
        })),
        prop::sample::select(vec![0u32, 90, 180, 270])
            .prop_map(|a| Op::Rotate(Rotation::from_degrees(a).unwrap())),
        (arb_side(), 1u32..=20000, 0u32..=2, any::<bool>()).prop_map(|(w, h, m, swap)| {
            let (width, height) = if swap { (Some(h), w) } else { (w, Some(h)) };
            Op::Resize(Resize {
                width,
                height,
                mode: ResizeMode::from_number(m).unwrap(),
            })
        }),
        ("\\PC{1,12}", arb_opacity(), 1u32..=600, any::<[u8; 3]>()).prop_map(
            |(text, opacity, dpi, c)| Op::Watermark(TextWatermark {
                text,
                opacity,
                dpi,
                color: Color {
                    r: c[0],
                    g: c[1],
                    b: c[2]
                }
            })
        ),
        ("\\PC{1,40}", 0u32..4000, 0u32..4000, arb_opacity()).prop_map(
            |(url, left, top, opacity)| Op::WatermarkImage(ImageWatermark {
                url,
                left,
                top,
                opacity
            })
        ),
        (0usize..4, prop::option::of(1u8..=100)).prop_map(|(k, quality)| Op::Format(Format {
            kind: [
                FormatKind::Jpeg,
                FormatKind::Png,
                FormatKind::Webp,
                FormatKind::Tiff
            ][k],
            quality
        })),
        (name, name).prop_map(|(bucket, key)| Op::Save(Save { bucket, key })),
    ]
}

proptest! {
    #[test]
    fn printing_round_trips(ops in prop::collection::vec(arb_op(), 1..=parse::MAX_WATERMARK_IMAGES)) {
        let action = Action { ops };
        let printed = action.to_string();
        let reparsed = Action::parse(&printed).unwrap();
        prop_assert_eq!(&reparsed, &action);
        prop_assert_eq!(reparsed.to_string(), printed);
    }

    #[test]
    fn arbitrary_strings_never_panic(s in "\\PC{0,80}") {
        let _ = Action::parse(&s);
    }

    #[test]
    fn action_like_strings_never_panic(
        s in "[a-z_]{0,16}(:[a-z]{0,2}_?[-0-9a-zA-Z.=+/#]{0,12}(,[a-z]{0,2}_?[-0-9a-zA-Z.=+/]{0,8}){0,4})?(\\|[a-z_]{0,16}:[a-z]_[0-9]{0,6}){0,3}"
    ) {
        if let Ok(a) = Action::parse(&s) {
            prop_assert_eq!(Action::parse(&a.to_string()).unwrap(), a);
        }
    }
}

#[test]
fn errors_show_at_most_64_characters_of_what_was_given() {
    let long = "9".repeat(2 << 20);
    let message = Action::parse(&format!("crop:w_{long}"))
        .unwrap_err()
        .to_string();
    assert!(message.len() < 300, "{} bytes", message.len());
    assert!(
        message.contains(&format!("{}… (2097152 bytes)", "9".repeat(64))),
        "{message}"
    );
    let message = Action::parse(&format!("{long}:w_1"))
        .unwrap_err()
        .to_string();
    assert!(
        message.len() < 300 && message.starts_with("unknown operation"),
        "{message}"
    );
    let message = Action::parse(&format!("crop:{long}"))
        .unwrap_err()
        .to_string();
    assert!(message.len() < 300, "{message}");
    // Short values are shown whole.
    let message = Action::parse("rotate:a_45").unwrap_err().to_string();
    assert!(message.ends_with("got 45"), "{message}");
}
