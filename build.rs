//! Names this build of the image code for the validators of processed
//! images (`?image`): `IMGFUNC_BUILD_ID`, a hash of the sources and the
//! locked dependencies, changes whenever a build's output may, and
//! `IMGFUNC_BUILD_TIME` says when it last did. A cache revalidating an
//! image made by an earlier build then gets the new one, not a 304.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.lock");
    let mut hash = DefaultHasher::new();
    let mut files = Vec::new();
    collect(Path::new("src"), &mut files);
    files.push(Path::new("Cargo.lock").to_path_buf());
    files.sort();
    for file in files {
        file.hash(&mut hash);
        std::fs::read(&file).unwrap_or_default().hash(&mut hash);
    }
    println!("cargo:rustc-env=IMGFUNC_BUILD_ID={:016x}", hash.finish());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!("cargo:rustc-env=IMGFUNC_BUILD_TIME={now}");
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else {
            files.push(path);
        }
    }
}
