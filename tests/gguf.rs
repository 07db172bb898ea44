//! GGUF reading: dequantisation against hand-computed values and malformed files.

mod common;

use common::gguf_writer::{Kv, Raw, f32_bytes, tiny_llama_gguf, write, write_with};
use devft::Error;
use devft::model::gguf::{GgufArray, GgufFile, GgufType, GgufValue};

fn open(bytes: &[u8]) -> devft::Result<GgufFile> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path)
}

fn f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

#[test]
fn dequantises_every_supported_type() {
    // Q8_0: d = 0.5, q = -16..16 -> x = 0.5 q.
    let mut q8 = f16(0.5).to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    // Q4_0: d = 0.25, byte j holds q_j (low) and q_{j+16} (high); x = d (q - 8).
    let mut q40 = f16(0.25).to_vec();
    q40.extend((0..16u8).map(|j| (j % 16) | (((15 - j) % 16) << 4)));
    // Q4_1: d = 2, m = -1; x = d q + m.
    let mut q41 = f16(2.0).to_vec();
    q41.extend(f16(-1.0));
    q41.extend((0..16u8).map(|j| j | (j << 4)));
    let f32s: Vec<u8> = [1.5f32, -2.25, 3.0, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bf: Vec<u8> = [1.0f32, -0.5]
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let file = open(&write(&[
        Raw("q8", vec![32], 8, q8),
        Raw("q40", vec![32], 2, q40),
        Raw("q41", vec![32], 3, q41),
        Raw("mat", vec![2, 2], 0, f32s),
        Raw("half", vec![2], 1, [f16(0.75), f16(-4.0)].concat()),
        Raw("bf", vec![2], 30, bf),
    ]))
    .unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(
        file.metadata["general.architecture"],
        GgufValue::String("llama".into())
    );

    let expected_q8: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(file.tensor("q8").unwrap().values(), expected_q8.as_slice());
    let low: Vec<f32> = (0..16).map(|j| 0.25 * (j as f32 - 8.0)).collect();
    let high: Vec<f32> = (0..16).map(|j| 0.25 * ((15 - j) as f32 - 8.0)).collect();
    assert_eq!(
        file.tensor("q40").unwrap().values(),
        [low, high].concat().as_slice()
    );
    let half41: Vec<f32> = (0..16).map(|j| 2.0 * j as f32 - 1.0).collect();
    assert_eq!(
        file.tensor("q41").unwrap().values(),
        [half41.clone(), half41].concat().as_slice()
    );
    let mat = file.tensor("mat").unwrap();
    assert_eq!(mat.shape(), &[2, 2]);
    assert_eq!(mat.values(), &[1.5, -2.25, 3.0, 0.0]);
    assert_eq!(file.tensor("half").unwrap().values(), &[0.75, -4.0]);
    assert_eq!(file.tensor("bf").unwrap().values(), &[1.0, -0.5]);
    assert!(matches!(
        file.tensor("absent"),
        Err(Error::MissingTensor { .. })
    ));
}

fn assert_gguf_error(bytes: &[u8], needle: &str) {
    match open(bytes) {
        Err(Error::Gguf { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
        Err(other) => panic!("expected a GGUF error about `{needle}`, got {other}"),
        Ok(_) => panic!("expected a GGUF error about `{needle}`"),
    }
}

#[test]
fn malformed_files_give_typed_errors() {
    let good = write(&[Raw("w", vec![4], 0, vec![0; 16])]);
    assert!(open(&good).is_ok());

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert_gguf_error(&bad_magic, "magic");

    assert_gguf_error(&good[..good.len() - 8], "past the end");
    assert_gguf_error(&good[..40], "truncated");

    let mut version = good.clone();
    version[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert_gguf_error(&version, "version");

    // The tensor count claims far more entries than the file could hold.
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert_gguf_error(&huge, "count");

    // IQ2_XXS (16): an i-quant, not read.
    assert_gguf_error(
        &write(&[Raw("k", vec![256], 16, vec![0; 66])]),
        "unsupported type 16",
    );

    // An offset far beyond the data.
    let mut past = write(&[Raw("w", vec![4], 0, vec![0; 16])]);
    // The entry: name "w", n_dims 1, dim 4, type 0, then the offset.
    let pos = find(&past, b"w\x01\x00\x00\x00").expect("tensor entry") + 1 + 4 + 8 + 4;
    past[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_gguf_error(&past, "past the end");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn tiny_llama_converted_to_gguf_gives_the_transformers_logits() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
    let params = devft::ParamMap::load_safetensors(format!("{dir}/model.safetensors")).unwrap();
    let bytes = tiny_llama_gguf(&params, |_, _, values| f32_bytes(values));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();

    let device = devft::device::default_device().unwrap();
    let model = devft::model::CausalLm::from_gguf(&path, &device).unwrap();
    assert_eq!(
        model.base_params(),
        params,
        "un-permuted weights equal the originals"
    );
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/logits.json")).unwrap())
            .unwrap();
    let sequence = &fixture["sequences"][0];
    let ids: Vec<u32> = sequence["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let expected: Vec<f64> = sequence["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let scores = model.score(&ids).unwrap();
    let diff = scores
        .logits
        .values()
        .iter()
        .zip(&expected)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "GGUF logits differ by {diff}");
}

/// The metadata of a tiny llama (8 layers of width 64) with `block_count` layers claimed.
fn tiny_llama_metadata(block_count: u32) -> Vec<(&'static str, Kv)> {
    vec![
        ("llama.embedding_length", Kv::U32(64)),
        ("llama.feed_forward_length", Kv::U32(176)),
        ("llama.block_count", Kv::U32(block_count)),
        ("llama.attention.head_count", Kv::U32(4)),
        ("llama.vocab_size", Kv::U32(256)),
    ]
}

#[test]
fn an_absurd_block_count_is_refused_before_allocating() {
    // Once `block_count` = 2^31 - 1 aborted the process in an allocation.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(
        &path,
        write_with(&tiny_llama_metadata(i32::MAX as u32), &[]),
    )
    .unwrap();
    let device = devft::device::default_device().unwrap();
    let err = devft::model::CausalLm::load(&path, &device).unwrap_err();
    match err {
        Error::Gguf {
            source_name,
            reason,
        } => {
            assert!(source_name.ends_with("model.gguf"), "{source_name}");
            assert!(
                reason.contains("block_count") && reason.contains("limit"),
                "{reason}"
            );
        }
        other => panic!("unexpected error {other}"),
    }
    // A plausible count with no tensors names the first missing tensor instead.
    std::fs::write(&path, write_with(&tiny_llama_metadata(8), &[])).unwrap();
    let err = devft::model::CausalLm::load(&path, &device).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err}");
}

#[test]
fn metadata_arrays_are_kept_in_their_own_width() {
    // Once every item became a 32-byte enum value: a 64 MB array cost 2.1 GB.
    let items: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = open(&write_with(&[("big", Kv::BytesArray(items.clone()))], &[])).unwrap();
    match &file.metadata["big"] {
        GgufValue::Array(GgufArray::U8(stored)) => assert_eq!(stored, &items),
        other => panic!("stored as {:?}", std::mem::discriminant(other)),
    }
    let GgufValue::Array(array) = &file.metadata["big"] else {
        unreachable!()
    };
    assert_eq!(array.len(), 1_000_000);
    assert_eq!(array.get(252), Some(GgufValue::Uint(1)));
    // A count beyond the bytes present is refused before anything is allocated.
    let mut bytes = write_with(&[("big", Kv::BytesArray(vec![1; 7]))], &[]);
    // Value type 9 (array), item type 0 (u8), count 7.
    let header = [9u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    let at = find(&bytes, &[header, 7u64.to_le_bytes().to_vec()].concat()).unwrap() + 8;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_gguf_error(&bytes, "exceeds");
}

#[test]
fn a_directory_named_like_a_gguf_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::create_dir(&path).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.to_string().contains("not a regular file")),
        "{err}"
    );
}

/// Every quantised type against the `gguf` package's numpy dequantisers
/// (`tests/fixtures/gguf-quants/generate.py`): random quants, 3 rows of 512 values each.
#[test]
fn quantised_types_match_the_gguf_package() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf-quants/quants.gguf");
    let file = GgufFile::open(&path).unwrap();
    let kinds = [
        ("q8_0", GgufType::Q8_0),
        ("q4_0", GgufType::Q4_0),
        ("q4_1", GgufType::Q4_1),
        ("q5_0", GgufType::Q5_0),
        ("q5_1", GgufType::Q5_1),
        ("q2_k", GgufType::Q2K),
        ("q3_k", GgufType::Q3K),
        ("q4_k", GgufType::Q4K),
        ("q5_k", GgufType::Q5K),
        ("q6_k", GgufType::Q6K),
    ];
    for (name, kind) in kinds {
        assert_eq!(file.tensors[name].kind, kind, "{name}");
        let got = file.tensor(name).unwrap();
        let expected = file.tensor(&format!("{name}.expected")).unwrap();
        assert_eq!(got.shape(), &[3, 512], "{name}");
        assert_eq!(got.shape(), expected.shape(), "{name}");
        for (i, (g, e)) in got.values().iter().zip(expected.values()).enumerate() {
            let tolerance = 1e-6 * e.abs().max(1.0);
            assert!(
                (g - e).abs() <= tolerance,
                "{name}[{i}]: devft {g}, gguf {e}"
            );
        }
    }
}

#[test]
fn a_row_that_is_not_a_whole_number_of_blocks_is_refused() {
    // 2 rows of 128 values stored as Q4_K: 256 values in all, one super-block, but rows of
    // 128 cannot be K-quantised.
    let bytes = write(&[Raw("w", vec![128, 2], 12, vec![0; 144])]);
    assert_gguf_error(&bytes, "w");
}
