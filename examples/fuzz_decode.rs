//! Mutation fuzzing of the decoders and pipelines on damaged images.
//!
//! `cargo run --release --example fuzz_decode -- SECONDS SEED_FILE...`
//! damages the seed files at random (bytes flipped or set, runs cut out or
//! repeated, files cut short, header bytes changed more often than scan
//! data), runs several actions on each, and stops at the first panic or at
//! a case that runs over 20 s, writing the input to `fuzz-case.bin`. Every
//! case is also read through `read_source`, as the server reads a stream.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use imgfunc::action::Action;
use imgfunc::imaging::{Limits, NoWatermarks, process, read_source};

const ACTIONS: &[&str] = &[
    "resize:w_100",
    "resize:w_40|format:t_png",
    "resize:w_256",
    "resize:w_512|format:t_webp",
    "resize:w_500,h_500,m_2|format:t_jpeg,q_85",
    "crop:w_300|rotate:a_90|resize:h_200|format:t_png",
    "crop:l_500,t_300,w_100,h_80",
    "crop:w_64,h_64,g_5|format:t_png",
    "info",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Where to damage: most often in the first 2 KiB (tables, frame and scan
/// headers), otherwise anywhere.
fn place(rng: &mut Rng, len: usize) -> usize {
    if rng.below(3) > 0 {
        rng.below(len.min(2048))
    } else {
        rng.below(len)
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if data.len() < 4 {
            break;
        }
        let at = place(rng, data.len());
        match rng.below(7) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = [0x00, 0xff, 0x01, 0x7f, 0x80, 0xfe][rng.below(6)],
            2 => data[at] = rng.next() as u8,
            3 => data.truncate(at.max(2)),
            4 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                let run: Vec<u8> = data[at..end].to_vec();
                let to = place(rng, data.len());
                data.splice(to..to, run);
            }
            _ => {
                // A 16-bit big-endian field (sizes, lengths) set to an edge.
                if at + 1 < data.len() {
                    let v: u16 = [0, 1, 8, 0xffff, 0x8000, 65500][rng.below(6)];
                    data[at..at + 2].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    data
}

fn run_case(data: &[u8], actions: &[Action], limits: &Limits) {
    for action in actions {
        let _ = process(data, action, limits, &NoWatermarks);
        let mut reader = data;
        if let Ok(kept) = read_source(&mut reader, data.len() as u64, action, limits) {
            let _ = process(&kept, action, limits, &NoWatermarks);
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seeds: Vec<Vec<u8>> = args
        .map(|p| std::fs::read(&p).expect("seed file"))
        .collect();
    assert!(!seeds.is_empty(), "usage: fuzz_decode SECONDS SEED_FILE...");
    let actions: Vec<Action> = ACTIONS
        .iter()
        .map(|a| Action::parse(a).expect("action"))
        .collect();
    let limits = Limits::default();
    let start = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut cases = 0u64;
    // The first panic's message, printed with the case that made it.
    static PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
    std::panic::set_hook(Box::new(|info| {
        let mut first = PANIC.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_empty() {
            *first = info.to_string();
        }
    }));
    while start.elapsed() < Duration::from_secs(seconds) {
        let seed = &seeds[rng.below(seeds.len())];
        let data = mutate(&mut rng, seed);
        let (tx, rx) = mpsc::channel();
        let (case, acts, lim) = (data.clone(), actions.clone(), limits.clone());
        std::thread::spawn(move || {
            let ran = std::panic::catch_unwind(|| run_case(&case, &acts, &lim));
            let _ = tx.send(ran.is_ok());
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(true) => {}
            Ok(false) => {
                std::fs::write("fuzz-case.bin", &data).expect("write case");
                let message = PANIC.lock().unwrap_or_else(|e| e.into_inner()).clone();
                eprintln!("panic after {cases} cases: {message}; input in fuzz-case.bin");
                std::process::exit(1);
            }
            Err(_) => {
                std::fs::write("fuzz-case.bin", &data).expect("write case");
                eprintln!("over 20 s after {cases} cases; input in fuzz-case.bin");
                std::process::exit(2);
            }
        }
        cases += 1;
    }
    println!("{cases} cases, no panic or hang");
}
