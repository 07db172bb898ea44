"""Tests of the devft_py extension (run from the repository root with the venv that has it):

    python bindings/python/tests/test_bindings.py

- a server and clients driven by hand give exactly `run_in_process` (adapter and ledger),
  also when every client restarts from its saved state after each task (FLoRA);
- adapters come out as float32 numpy arrays of their shapes;
- devft errors are typed exceptions under DevftError, for bad settings, bad messages and
  misuse, and a bad reply is a failed client, not an exception;
- training releases the GIL (a Python thread keeps running while a client trains);
- a GGUF base kept quantised trains as the same file decoded to f32, with a smaller estimate.
"""
import json
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

import numpy as np

import devft_py

# The Flower checker's safetensors reader (scripts/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from flower_check import load_safetensors  # noqa: E402  pylint: disable=wrong-import-position

SETTINGS = {
    "model": "tests/fixtures/tiny-llama",
    "data": "tests/fixtures/data/tiny_instructions.jsonl",
    "num-partitions": 3,
    "clients-per-round": 2,
    "schedule": "2:2,8:1",
    "rounds": 3,
    "max-len": 64,
    "lora-rank": 4,
    "lora-alpha": 8.0,
    "learning-rate": 0.005,
    "local-steps": 2,
    "seed": 7,
}


def assert_same_traffic(test, ledger, expected):
    """The ledgers are equal but for a reply's whole size, whose header carries the client's
    measured peak memory: that may differ by the digits of the number."""
    entries, expected_entries = ledger["entries"], expected["entries"]
    test.assertEqual(len(entries), len(expected_entries))
    for a, b in zip(entries, expected_entries):
        test.assertLessEqual(abs(a["up"]["total"] - b["up"]["total"]), 24)
        test.assertEqual({**a, "up": {**a["up"], "total": 0}}, {**b, "up": {**b["up"], "total": 0}})


def tiny_llama_q8_0_gguf(path):
    """tests/fixtures/tiny-llama written as a GGUF file the way llama.cpp's converter does
    (llama.cpp names, Q/K rows permuted for its RoPE layout), with the `gguf` package: Q8_0
    for every matrix whose rows split into 32-value blocks, F32 for the rest."""
    import gguf  # pylint: disable=import-outside-toplevel

    config = json.loads(Path("tests/fixtures/tiny-llama/config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py `permute`
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_context_length(config["max_position_embeddings"])
    for name, w in load_safetensors(Path("tests/fixtures/tiny-llama/model.safetensors")).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.endswith("q_proj.weight"):
            w = permute(w, heads)
        elif name.endswith("k_proj.weight"):
            w = permute(w, kv_heads)
        if name in fixed:
            gguf_name = fixed[name]
        else:
            layer, inner = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = inner.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{names[module]}.{suffix}"
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def drive(settings, corrupt=None, restart=False):
    """Runs the settings through a Server and Clients by hand; `corrupt(round, client, bytes)`
    may replace a reply; with `restart`, every client restarts from its `state()` after each
    task, as a Flower ClientApp does."""
    server = devft_py.Server(settings)
    clients = [devft_py.Client(settings, p) for p in range(settings["num-partitions"])]
    while not server.is_finished():
        plan = server.configure_round()
        replies = []
        for task in plan["tasks"]:
            reply = clients[task["client"]].train(task["setup"], task["task"])
            if restart:
                saved = clients[task["client"]].state()
                clients[task["client"]] = devft_py.Client(settings, task["client"], saved)
            if corrupt is not None:
                reply = corrupt(plan["round"], task["client"], reply)
            replies.append((task["client"], reply, None if reply else "dropped"))
        server.aggregate_round(replies)
        server.finish_round(True)
    return server


class Bindings(unittest.TestCase):
    def test_by_hand_equals_in_process_exactly(self):
        server = drive(SETTINGS)
        expected = devft_py.run_in_process(SETTINGS)
        adapter = server.adapter()
        self.assertEqual(sorted(adapter), sorted(expected["adapter"]))
        for name, value in adapter.items():
            self.assertEqual(value.dtype, np.float32)
            self.assertEqual(value.ndim, 2, name)
            np.testing.assert_array_equal(value, expected["adapter"][name], err_msg=name)
        assert_same_traffic(self, json.loads(server.ledger_json()), json.loads(expected["ledger"]))
        metrics = json.loads(server.metrics_json())
        self.assertEqual([m["capacity"] for m in metrics], [2, 2, 8])
        self.assertLess(metrics[-1]["eval_loss"], metrics[0]["eval_loss"] + 1.0)
        settings = json.loads(server.settings_json())
        self.assertEqual(settings["aggregator"], "fedavg")  # the default, filled in

    def test_clients_restarted_from_their_state_equal_in_process(self):
        # FLoRA needs every merge on every client, so they must survive a restart. Three
        # stage-0 rounds, so that some client misses a merge.
        settings = {**SETTINGS, "aggregator": "flora", "schedule": "2:3,8:1", "rounds": 4}
        server = drive(settings, restart=True)
        expected = devft_py.run_in_process(settings)
        for name, value in server.adapter().items():
            np.testing.assert_array_equal(value, expected["adapter"][name], err_msg=name)
        assert_same_traffic(self, json.loads(server.ledger_json()), json.loads(expected["ledger"]))
        self.assertIsNone(devft_py.Client(SETTINGS, 0).state())
        # FedSA-LoRA's stage transfer needs every client's B, which no message brings yet.
        with self.assertRaises(devft_py.InvalidArgumentError):
            devft_py.Server({**SETTINGS, "aggregator": "fedsa-lora"})

    def test_a_client_whose_memory_budget_is_too_small_is_left_out(self):
        server = devft_py.Server(SETTINGS)
        server.declare_memory_budget(0, 1024)
        with self.assertRaises(devft_py.InvalidArgumentError):
            server.declare_memory_budget(SETTINGS["num-partitions"], None)
        plan = server.configure_round()
        self.assertEqual(sorted(t["client"] for t in plan["tasks"]), [1, 2])
        clients = {c: devft_py.Client(SETTINGS, c) for c in (1, 2)}
        replies = [(t["client"], clients[t["client"]].train(t["setup"], t["task"]), None) for t in plan["tasks"]]
        server.aggregate_round(replies)
        server.finish_round(False)
        (metrics,) = json.loads(server.metrics_json())
        self.assertEqual([c for c, _ in metrics["clients_excluded"]], [0])
        self.assertIn("memory budget", metrics["clients_excluded"][0][1])

    def test_a_memory_budget_parses_as_the_settings_read_it(self):
        self.assertEqual(devft_py.parse_memory_budget("640M"), 640 << 20)
        self.assertEqual(devft_py.parse_memory_budget(" 1.5G "), 3 << 29)
        self.assertEqual(devft_py.parse_memory_budget("4096"), 4096)
        self.assertIsNone(devft_py.parse_memory_budget("none"))
        self.assertIsNone(devft_py.parse_memory_budget(""))
        for bad in ("lots", "-1M", "2T", "1K,2K", "nan"):
            with self.assertRaises(devft_py.InvalidArgumentError):
                devft_py.parse_memory_budget(bad)

    def test_budgets_from_the_settings_leave_the_small_client_out(self):
        settings = {**SETTINGS, "client-memory": "1K, none, none"}
        server = drive(settings)
        expected = devft_py.run_in_process(settings)
        assert_same_traffic(self, json.loads(server.ledger_json()), json.loads(expected["ledger"]))
        for metrics in json.loads(server.metrics_json()):
            self.assertEqual([c for c, _ in metrics["clients_excluded"]], [0])
            self.assertNotIn(0, metrics["clients_sampled"])
        for bad in ("1K,2K", "lots"):
            with self.assertRaises(devft_py.InvalidArgumentError):
                devft_py.Server({**SETTINGS, "client-memory": bad})

    def test_a_quantised_base_needs_a_gguf_model(self):
        # The tiny fixture is a safetensors directory: only a GGUF file stores blocks to keep.
        for bad in ("quantised", "q4"):
            with self.assertRaises(devft_py.InvalidArgumentError):
                devft_py.Server({**SETTINGS, "base": bad})

    def test_a_quantised_base_trains_as_its_decoded_f32_base(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny-llama-q8_0.gguf"
            tiny_llama_q8_0_gguf(path)
            settings = {**SETTINGS, "model": str(path), "tokenizer": "bytes"}
            decoded = devft_py.run_in_process({**settings, "base": "f32"})
            kept = devft_py.run_in_process({**settings, "base": "quantised"})
        for name, expected in decoded["adapter"].items():
            diff = np.linalg.norm(kept["adapter"][name] - expected) / max(np.linalg.norm(expected), 1e-6)
            self.assertLess(diff, 1e-3, name)
        decoded_metrics, kept_metrics = json.loads(decoded["metrics"]), json.loads(kept["metrics"])
        for d, k in zip(decoded_metrics, kept_metrics):
            self.assertAlmostEqual(d["train_loss"], k["train_loss"], delta=1e-4)
        # The estimate counts the blocks as stored: a quarter of f32 for Q8_0's matrices.
        self.assertLess(kept_metrics[-1]["memory_bytes"], decoded_metrics[-1]["memory_bytes"])

    def test_bad_replies_are_failed_clients(self):
        def corrupt(round, client, reply):
            if round != 1:
                return reply
            return [b"garbage", reply[: len(reply) // 2], None][client % 3]

        server = drive(SETTINGS, corrupt)
        first = json.loads(server.metrics_json())[0]
        reasons = dict((c, r) for c, r in first["clients_failed"])
        self.assertEqual(sorted(reasons), sorted(first["clients_sampled"]))
        for client, reason in reasons.items():
            self.assertTrue(reason, client)
        self.assertFalse(first["aggregated"])

    def test_errors_are_typed(self):
        with self.assertRaises(devft_py.InvalidArgumentError):
            devft_py.Server({**SETTINGS, "aggregator": "fedsgd"})
        with self.assertRaises(devft_py.InvalidArgumentError):
            devft_py.Server({k: v for k, v in SETTINGS.items() if k != "model"})
        with self.assertRaises(devft_py.IoError):
            devft_py.Server({**SETTINGS, "model": "no/such/model"})
        with self.assertRaises(devft_py.InvalidArgumentError):
            devft_py.Client(SETTINGS, 3)
        client = devft_py.Client(SETTINGS, 0)
        with self.assertRaises(devft_py.InvalidMessageError):
            client.train(None, b"DEVFTMSG not a message")
        server = devft_py.Server(SETTINGS)
        with self.assertRaises(devft_py.InvalidArgumentError):
            server.finish_round(False)  # no round is open
        self.assertTrue(issubclass(devft_py.InvalidMessageError, devft_py.DevftError))
        self.assertTrue(issubclass(devft_py.DevftError, Exception))

    def test_training_releases_the_gil(self):
        server = devft_py.Server(SETTINGS)
        client = devft_py.Client(SETTINGS, 0)
        plan = server.configure_round()
        task = next(t for t in plan["tasks"])
        trainer = devft_py.Client(SETTINGS, task["client"])
        ticks = 0
        done = threading.Event()

        def count():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                time.sleep(0.001)

        counter = threading.Thread(target=count)
        counter.start()
        started = time.perf_counter()
        trainer.train(task["setup"], task["task"])
        seconds = time.perf_counter() - started
        done.set()
        counter.join()
        del client
        # With the GIL held the counter could not tick at all while Rust trains.
        self.assertGreater(ticks, 10 * seconds, f"{ticks} ticks in {seconds:.2f} s")


if __name__ == "__main__":
    unittest.main(verbosity=2)
