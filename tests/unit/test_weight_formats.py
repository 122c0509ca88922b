"""PyTorch zip checkpoints, GGUF and ONNX checked from their directories and headers (README, "The
model store"): what each format's writer produces passes; a file whose structure lies is refused."""

import io
import struct
import zipfile

import pytest

from gpu_orchestrator.loaders.formats import ModelError, check_weight


def check(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    with open(path, "rb") as handle:
        return check_weight(handle, name)


# ---- PyTorch zip checkpoints ---------------------------------------------------------------------

PICKLE = b"\x80\x02}q\x00."  # protocol 2, an empty dict: how torch.save's data.pkl starts


def checkpoint(entries=None, compression=zipfile.ZIP_STORED) -> bytes:
    """A zip laid out as torch.save writes one: every entry in one top folder, data.pkl first."""
    entries = entries or {"archive/data.pkl": PICKLE, "archive/byteorder": b"little",
                          "archive/data/0": bytes(4096), "archive/version": b"3\n"}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return buffer.getvalue()


def directory_entry(data: bytes, entry: str) -> int:
    """The offset of `entry`'s record in the central directory of the zip `data`."""
    at = data.find(b"PK\x01\x02")
    while at != -1:
        length = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + length] == entry.encode():
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(entry)


def directory_start(data: bytes) -> int:
    return struct.unpack_from("<I", data, data.rfind(b"PK\x05\x06") + 16)[0]


def test_checkpoints_as_torch_save_writes_them_pass(tmp_path):
    check(tmp_path, "pytorch_model.bin", checkpoint())
    check(tmp_path, "model.pt", checkpoint({"model/data.pkl": b"\x80\x05\x95"}))  # protocol 5, a top folder named for the file
    check(tmp_path, "model.pth", checkpoint(compression=zipfile.ZIP_DEFLATED))  # recompressed: data.pkl read through zlib
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # zip64 records, as torch writes past 4 GiB
        for entry, data in {"archive/data.pkl": PICKLE, "archive/data/0": bytes(64)}.items():
            with archive.open(entry, "w", force_zip64=True) as member:
                member.write(data)
    check(tmp_path, "model.pt", buffer.getvalue())


def test_checkpoints_torch_writes_pass(tmp_path):
    torch = pytest.importorskip("torch", reason="the [torch] extra installs torch")
    for name, options in [("model.pt", {}), ("model.pth", {"pickle_protocol": 4}), ("pytorch_model.bin", {})]:
        path = tmp_path / name
        torch.save({f"layer{i}": torch.zeros(i + 1, 3) for i in range(20)}, path, **options)
        with open(path, "rb") as handle:
            check_weight(handle, name)
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(2)}, buffer)  # to a stream: the folder is "archive"
        check(tmp_path, name, buffer.getvalue())


def test_a_legacy_pickle_checkpoint_is_still_refused(tmp_path):
    with pytest.raises(ModelError, match="not a valid PyTorch zip checkpoint"):
        check(tmp_path, "model.pt", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")


def test_a_central_directory_without_the_files_it_lists_is_refused(tmp_path):
    data = checkpoint()
    gutted = b"\xde\xad" * 10 + data[directory_start(data):]
    with pytest.raises(ModelError, match="zip entry 'archive/data.pkl' has its local header at offset -"):
        check(tmp_path, "pytorch_model.bin", gutted)


def test_an_entry_claiming_more_bytes_than_the_file_holds_is_refused(tmp_path):
    data = bytearray(checkpoint())
    struct.pack_into("<II", data, directory_entry(data, "archive/data/0") + 20, 0xFFFFFFF0, 0xFFFFFFF0)
    with pytest.raises(ModelError, match="'archive/data/0' claims 4294967280 bytes at offset .* run past the central directory"):
        check(tmp_path, "pytorch_model.bin", bytes(data))


def test_a_local_header_that_is_missing_or_names_another_file_is_refused(tmp_path):
    data = checkpoint()
    offset = struct.unpack_from("<I", data, directory_entry(data, "archive/data/0") + 42)[0]
    clobbered = data[:offset] + b"XXXX" + data[offset + 4:]
    with pytest.raises(ModelError, match="'archive/data/0': no local file header at offset"):
        check(tmp_path, "pytorch_model.bin", clobbered)
    renamed = data[:offset + 30] + b"archive/data/1" + data[offset + 44:]
    with pytest.raises(ModelError, match="'archive/data/0': the local header at offset .* names another file"):
        check(tmp_path, "pytorch_model.bin", renamed)


def test_entries_overlapping_each_other_or_the_directory_are_refused(tmp_path):
    data = bytearray(checkpoint())
    pickle_entry = directory_entry(data, "archive/data.pkl")
    struct.pack_into("<I", data, directory_entry(data, "archive/version") + 42,
                     struct.unpack_from("<I", data, pickle_entry + 42)[0])  # two records, one local header
    with pytest.raises(ModelError):  # the names differ, or (same name) the spans overlap
        check(tmp_path, "pytorch_model.bin", bytes(data))
    data = bytearray(checkpoint({"archive/data.pkl": PICKLE, "archive/x": b"a", "archive/y": b"b"}))
    x, y = directory_entry(data, "archive/x"), directory_entry(data, "archive/y")
    x_offset, y_offset = (struct.unpack_from("<I", data, entry + 42)[0] for entry in (x, y))
    struct.pack_into("<I", data, x + 20, y_offset + 1 - (x_offset + 30 + len("archive/x")))  # over y's header
    with pytest.raises(ModelError, match="zip entries 'archive/x' and 'archive/y' overlap"):
        check(tmp_path, "pytorch_model.bin", bytes(data))
    data = bytearray(checkpoint())
    struct.pack_into("<I", data, directory_entry(data, "archive/version") + 20, 200)  # into the directory
    with pytest.raises(ModelError, match="'archive/version' claims 200 bytes .* run past the central directory"):
        check(tmp_path, "pytorch_model.bin", bytes(data))


@pytest.mark.parametrize("entries,message", [
    ({"data.pkl": b"not a pickle"}, "entries are not in a top folder, as torch.save writes them .*'data.pkl'"),
    ({"archive/data.pkl": b"not a pickle"}, r"archive/data.pkl starts with b'no', not with a pickle protocol 2-5"),
    ({"archive/data.pkl": b"\x80\x09xx"}, "not with a pickle protocol 2-5"),
    ({"archive/data.pkl": b""}, "starts with b''"),
    ({"archive/version": b"3\n", "other/data.pkl": PICKLE}, "no data.pkl in its top folder 'archive'"),
])
def test_a_checkpoint_without_a_pickled_data_pkl_in_its_folder_is_refused(tmp_path, entries, message):
    with pytest.raises(ModelError, match=message):
        check(tmp_path, "model.pt", checkpoint(entries))


# ---- GGUF ------------------------------------------------------------------------------------------

def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def gguf_kv(key: str, value_type: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + value


def gguf_tensor(name: str, dims, ggml_type: int, offset: int) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf(kvs=(), tensors=(), data_len=0, alignment=32, version=3, counts=None) -> bytes:
    """A GGUF file: header, key-values, tensor infos, padding to `alignment`, `data_len` data bytes."""
    kvs, tensors = list(kvs), list(tensors)
    head = b"GGUF" + struct.pack("<IQQ", version, *(counts or (len(tensors), len(kvs))))
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % alignment) + bytes(data_len) if tensors else body


METADATA = [
    gguf_kv("general.architecture", 8, gguf_string("llama")),
    gguf_kv("a.u8", 0, b"\x01"), gguf_kv("a.i16", 3, b"\x01\x00"), gguf_kv("a.f32", 6, bytes(4)),
    gguf_kv("a.bool", 7, b"\x01"), gguf_kv("a.u64", 10, bytes(8)), gguf_kv("a.f64", 12, bytes(8)),
    gguf_kv("tokens", 9, struct.pack("<IQ", 8, 3) + gguf_string("a") + gguf_string("") + gguf_string("ccc")),
    gguf_kv("scores", 9, struct.pack("<IQ", 6, 3) + bytes(12)),
    gguf_kv("nested", 9, struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 4, 1) + bytes(4) + struct.pack("<IQ", 8, 1) + gguf_string("x")),
]
# F32 [5, 3]: 60 bytes at 0; Q8_0 [64]: 2 blocks of 34 at 64; Q4_K [256, 2]: 2 blocks of 144 at 160.
TENSORS = [gguf_tensor("f32", [5, 3], 0, 0), gguf_tensor("q8", [64], 8, 64), gguf_tensor("q4k", [256, 2], 12, 160)]


def test_gguf_files_as_the_writer_lays_them_out_pass(tmp_path):
    check(tmp_path, "model.gguf", gguf(METADATA, TENSORS, 160 + 288))
    check(tmp_path, "model.gguf", gguf())  # no tensor, no key-value: a header alone
    aligned = [*METADATA, gguf_kv("general.alignment", 4, struct.pack("<I", 128))]
    check(tmp_path, "model.gguf", gguf(aligned, TENSORS, 160 + 288, alignment=128))
    check(tmp_path, "model.gguf", gguf(METADATA, [gguf_tensor("new", [7], 99, 0)], 1))  # an unknown type: offset only


def test_gguf_files_gguf_py_writes_pass(tmp_path):
    pytest.importorskip("gguf", reason="gguf-py is not a dependency")
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(1000)])
    writer.add_tensor("f32", np.ones((3, 5), dtype=np.float32))
    writer.add_tensor("q6k", np.zeros((3, 210), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb") as handle:
        check_weight(handle, "model.gguf")


@pytest.mark.parametrize("data,message", [
    (b"GGUF", "GGUF header is 4 bytes, not 24; the file is truncated"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40), "claims 1099511627776 tensors and 1099511627776 metadata key-values, more than its 24 bytes"),
    (gguf(METADATA, TENSORS, 160 + 288, counts=(3, 10**6)), "claims 3 tensors and 1000000 metadata key-values"),
    (b"GGML" + bytes(20), "does not start the way GGUF files do"),
    (gguf(version=1), "GGUF version 1; only versions 2 and 3"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "a big-endian file"),
    (gguf(METADATA, TENSORS, 160 + 287), r"tensor 'q4k' bytes 160-448 lie outside the file's 447 data bytes"),
    (b"GGUF" + struct.pack("<IQQ", 3, 3, len(METADATA)) + b"".join(METADATA + TENSORS)[:-10],
     "GGUF file ends at byte .* but needs 12 more bytes"),  # cut in the last tensor info's type and offset
    (gguf(METADATA[:7] + [gguf_kv("tokens", 9, struct.pack("<IQ", 8, 10**6) + bytes(64))]), "GGUF file ends at byte"),
    (gguf([gguf_kv("s", 8, struct.pack("<Q", 2**63))]), "needs 9223372036854775808 more bytes"),
    (gguf([gguf_kv("a", 13, bytes(8))]), "metadata value at offset 33 has unknown type 13"),
    (gguf([gguf_kv("a", 9, struct.pack("<IQ", 13, 1) + bytes(8))]), "metadata array .* unknown item type 13"),
    (gguf([gguf_kv("general.alignment", 10, bytes(8))]), "general.alignment has value type 10, not uint32"),
    (gguf([gguf_kv("general.alignment", 4, struct.pack("<I", 48))]), "general.alignment 48 is not a power of two"),
    (gguf([], [gguf_tensor("q8", [48], 8, 0)], 64), "tensor 'q8' has 48 elements a row, not a multiple of its type 8's block of 32"),
    (gguf([], [gguf_tensor("t", [1] * 5, 0, 0)], 64), "tensor 't' has 5 dimensions, over ggml's 4"),
    (gguf([], [gguf_tensor("t", [2**32, 2**32], 0, 0)], 64), "tensor 't' bytes 0-73786976294838206464 lie outside"),
])
def test_gguf_files_whose_structure_does_not_fit_are_refused(tmp_path, data, message):
    with pytest.raises(ModelError, match=message):
        check(tmp_path, "model.gguf", data)


# ---- ONNX ------------------------------------------------------------------------------------------

def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


GRAPH = field(1, b"node") + field(5, bytes(1000))  # what it holds is not walked
MODEL = (b"\x08\x08" + field(2, b"pytorch") + field(3, b"2.4") + varint(5 << 3) + varint(300)
         + field(7, GRAPH) + field(8, b"\x10\x11") + varint(9 << 3 | 1) + bytes(8) + varint(10 << 3 | 5) + bytes(4))


def test_onnx_models_pass(tmp_path):
    check(tmp_path, "model.onnx", MODEL)


def test_models_onnx_writes_pass(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not a dependency")
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    check(tmp_path, "model.onnx", helper.make_model(graph, producer_name="test").SerializeToString())
    assert onnx  # imported for its helper


@pytest.mark.parametrize("data,message", [
    (b"\x08", "ONNX model ends inside a number at offset 1; the file is truncated"),
    (b"\x08\x07" + field(2, b"pytorch"), "ONNX model has no graph"),
    (b"\x08\x07" + varint(7 << 3 | 2) + varint(1000) + bytes(10), "ONNX model ends at byte 15, but needs 1000 more bytes at offset 5"),
    (b"\x08\x07" + varint(7 << 3 | 3) + field(7, GRAPH), r"malformed field \(tag 59\) at offset 2"),  # a group
    (b"\x08\x07" + varint(7 << 3 | 6) + field(7, GRAPH), r"malformed field \(tag 62\)"),
    (b"\x08\x07" + b"\x02" + field(7, GRAPH), r"malformed field \(tag 2\)"),  # field 0
    (MODEL + varint(9 << 3 | 1) + bytes(7), "needs 8 more bytes"),
    (b"\x08" + b"\xff" * 11 + field(7, GRAPH), "number over 10 bytes long at offset 1"),
    (b"<html>not a model</html>", "does not start the way ONNX files do"),
])
def test_onnx_files_that_are_not_a_model_proto_are_refused(tmp_path, data, message):
    with pytest.raises(ModelError, match=message):
        check(tmp_path, "model.onnx", data)


def test_headers_longer_than_one_read_are_walked_across_reads(tmp_path, monkeypatch):
    from gpu_orchestrator.loaders import weight_formats
    monkeypatch.setattr(weight_formats, "CHUNK", 16)  # every few fields, a read of the next bytes
    check(tmp_path, "model.gguf", gguf(METADATA, TENSORS, 160 + 288))
    check(tmp_path, "model.onnx", MODEL)
    words = struct.pack("<IQ", 8, 40) + b"".join(gguf_string("w" * (i % 7)) for i in range(39))
    check(tmp_path, "model.gguf", gguf([gguf_kv("tokens", 9, words + gguf_string("last"))]))
    with pytest.raises(ModelError, match=r"GGUF file ends at byte (\d+), inside a string that runs to byte \d+"):
        check(tmp_path, "model.gguf", gguf([gguf_kv("tokens", 9, words + gguf_string("last")[:-1])]))
