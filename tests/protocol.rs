//! The protocol's messages: every kind round-trips through bytes; a message that is
//! truncated, oversized, of another kind or version, forged or inconsistent is refused with
//! `InvalidMessage` naming the sender, before anything it announces is allocated.

use devft::Error;
use devft::aggregate::ClientInstructions;
use devft::federated::LocalTrainingConfig;
use devft::federated::protocol::{
    DeviceState, EvaluateReply, EvaluateTask, MergeSync, MergedStage, Message, PROTOCOL_VERSION,
    StageSetup, StartAdapter, TrainReply, TrainTask,
};
use devft::grouping::Grouping;
use devft::{HostTensor, ParamMap};

fn map(names: &[&str], seed: f32) -> ParamMap {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let values = (0..6).map(|j| seed + (i * 6 + j) as f32 * 0.25).collect();
            (
                name.to_string(),
                HostTensor::new(vec![2, 3], values).unwrap(),
            )
        })
        .collect()
}

fn train_task() -> TrainTask {
    TrainTask {
        round: 4,
        stage: 1,
        seed: u64::MAX - 3,
        instructions: ClientInstructions {
            proximal_mu: 0.01,
            freeze_lora_a: false,
            kept_on_client: vec![".lora_B.".into()],
        },
        local: LocalTrainingConfig::new().with_local_steps(7),
        adapter: map(&["a", "b.c"], 1.0),
        merges: MergeSync {
            first: 2,
            merges: vec![map(&["a"], -1.0), map(&["a", "d"], 3.0)],
        },
    }
}

fn stage_setup() -> StageSetup {
    StageSetup {
        stage: 2,
        grouping: Grouping::new(vec![vec![0, 2], vec![1, 3]], 4).unwrap(),
        fuser: "differential(beta=0.2)".into(),
        start: StartAdapter::PerGroup {
            grouping: Grouping::new(vec![vec![0, 1, 2], vec![3]], 4).unwrap(),
            adapter: map(&["x", "y"], 0.5),
        },
        history: vec![
            MergedStage {
                grouping: Grouping::new(vec![vec![0, 1, 2, 3]], 4).unwrap(),
                merges: vec![map(&["m"], 2.0), map(&["m"], 4.0)],
            },
            MergedStage {
                grouping: Grouping::singletons(4),
                merges: vec![],
            },
        ],
    }
}

fn evaluate_task() -> EvaluateTask {
    EvaluateTask {
        round: 9,
        stage: 0,
        adapter: map(&["a"], 0.0),
        merges: MergeSync::default(),
        batch_size: 3,
        pad_id: 2,
    }
}

fn train_reply() -> TrainReply {
    TrainReply {
        round: 4,
        client: 2,
        num_examples: 31,
        // A value a fast float parser reads one ulp off: metrics must round-trip exactly.
        metrics: [("train_loss".to_string(), 3.6845573560955622)].into(),
        adapter: map(&["a"], 7.0),
    }
}

fn assert_invalid<T: std::fmt::Debug>(result: devft::Result<T>, needle: &str) {
    match result {
        Err(Error::InvalidMessage { sender, reason }) => {
            assert_eq!(sender, "peer");
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        }
        other => panic!("expected InvalidMessage ({needle}), got {other:?}"),
    }
}

/// The JSON header of a message, and the message rebuilt around an edited header.
fn header(bytes: &[u8]) -> serde_json::Value {
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[20..20 + len]).unwrap()
}

fn with_header(bytes: &[u8], header: &serde_json::Value) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    let json = serde_json::to_vec(header).unwrap();
    let mut out = bytes[..12].to_vec();
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[20 + len..]);
    out
}

#[test]
fn every_message_round_trips_and_reports_its_size() {
    let task = train_task();
    let bytes = task.to_bytes().unwrap();
    assert_eq!(
        TrainTask::from_bytes(&bytes, bytes.len(), "peer").unwrap(),
        task
    );
    // adapter (2 tensors) and merges (1 + 2 tensors), six values each.
    assert_eq!(task.num_values(), 5 * 6);
    let size = task.wire_size().unwrap();
    assert_eq!(size.payload, 4 * 30);
    assert_eq!(size.total, bytes.len() as u64);
    assert_eq!(&bytes[..8], b"DEVFTMSG");
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        PROTOCOL_VERSION
    );

    let setup = stage_setup();
    let bytes = setup.to_bytes().unwrap();
    assert_eq!(
        StageSetup::from_bytes(&bytes, usize::MAX, "peer").unwrap(),
        setup
    );
    assert_eq!(setup.num_values(), 4 * 6);

    let reply = train_reply();
    let bytes = reply.to_bytes().unwrap();
    assert_eq!(
        TrainReply::from_bytes(&bytes, usize::MAX, "peer").unwrap(),
        reply
    );

    let evaluate = evaluate_task();
    let bytes = evaluate.to_bytes().unwrap();
    assert_eq!(
        EvaluateTask::from_bytes(&bytes, usize::MAX, "peer").unwrap(),
        evaluate
    );

    let initial = StageSetup {
        start: StartAdapter::Initial {
            sha256: "ab".repeat(32),
        },
        ..stage_setup()
    };
    let bytes = initial.to_bytes().unwrap();
    assert_eq!(
        StageSetup::from_bytes(&bytes, usize::MAX, "peer").unwrap(),
        initial
    );

    for personal in [None, Some((2, map(&["p"], 9.0)))] {
        let state = DeviceState {
            client: 4,
            setup: stage_setup(),
            merges: vec![map(&["a"], 1.0), map(&["a"], 2.0)],
            personal,
        };
        let bytes = state.to_bytes().unwrap();
        assert_eq!(
            DeviceState::from_bytes(&bytes, usize::MAX, "peer").unwrap(),
            state
        );
    }

    let answer = EvaluateReply {
        round: 9,
        client: 1,
        loss: 3.25,
        num_targets: 40,
    };
    let bytes = answer.to_bytes().unwrap();
    assert_eq!(
        EvaluateReply::from_bytes(&bytes, usize::MAX, "peer").unwrap(),
        answer
    );
    assert_eq!(answer.wire_size().unwrap().payload, 0);
}

#[test]
fn damaged_or_foreign_messages_are_refused() {
    let bytes = train_task().to_bytes().unwrap();
    assert_invalid(
        TrainTask::from_bytes(&bytes, bytes.len() - 1, "peer"),
        "more than",
    );
    assert_invalid(
        TrainTask::from_bytes(&bytes[..10], usize::MAX, "peer"),
        "magic",
    );
    assert_invalid(
        TrainTask::from_bytes(&bytes[..bytes.len() - 5], usize::MAX, "peer"),
        "malformed tensors",
    );
    assert_invalid(
        TrainTask::from_bytes(&bytes[..30], usize::MAX, "peer"),
        "header",
    );
    let mut other_version = bytes.clone();
    other_version[8..12].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    assert_invalid(
        TrainTask::from_bytes(&other_version, usize::MAX, "peer"),
        "protocol version",
    );
    let mut long_header = bytes.clone();
    long_header[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_invalid(
        TrainTask::from_bytes(&long_header, usize::MAX, "peer"),
        "truncated",
    );
    // A reply is not a task.
    let reply = train_reply().to_bytes().unwrap();
    assert_invalid(
        TrainTask::from_bytes(&reply, usize::MAX, "peer"),
        "train_reply",
    );
    assert_invalid(
        EvaluateReply::from_bytes(&reply, usize::MAX, "peer"),
        "where `evaluate_reply`",
    );
}

#[test]
fn forged_headers_cannot_make_the_reader_allocate_or_misplace_tensors() {
    let bytes = train_task().to_bytes().unwrap();
    // A billion announced merges in a message with five tensors.
    let mut forged = header(&bytes);
    forged["merges"] = serde_json::json!(1_000_000_000u64);
    assert_invalid(
        TrainTask::from_bytes(&with_header(&bytes, &forged), usize::MAX, "peer"),
        "announces",
    );
    // Fewer merges than the message carries: a tensor without a section.
    forged["merges"] = serde_json::json!(1);
    assert_invalid(
        TrainTask::from_bytes(&with_header(&bytes, &forged), usize::MAX, "peer"),
        "unexpected tensor",
    );
    // A set-up whose history announces a merge it does not carry.
    let setup = stage_setup().to_bytes().unwrap();
    let mut forged = header(&setup);
    forged["setup"]["history"][1][1] = serde_json::json!(1);
    assert_invalid(
        StageSetup::from_bytes(&with_header(&setup, &forged), usize::MAX, "peer"),
        "no tensor",
    );
    // A grouping that is not a partition is refused by the header's parser.
    let mut forged = header(&setup);
    forged["setup"]["grouping"]["groups"] = serde_json::json!([[0, 1], [1, 2, 3]]);
    assert_invalid(
        StageSetup::from_bytes(&with_header(&setup, &forged), usize::MAX, "peer"),
        "bad header",
    );
}
