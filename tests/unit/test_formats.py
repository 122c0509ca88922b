"""safetensors headers judged as the library's serde_json reads them: keys given twice, lone
UTF-16 surrogates, -0 and numbers out of range (README, "The model store")."""

import struct

import pytest

from gpu_orchestrator.loaders.formats import check_safetensors
from gpu_orchestrator.loaders.backends import ModelError

W = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'

# (header text, bytes of data, whether the library (0.8) accepts it), each as the library judged it.
HEADERS = [
    ('{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"},"w":%s}' % W, 4, False),
    ('{"__metadata__":{},"__metadata\\u005f_":{},"w":%s}' % W, 4, False),    # the same key, escaped
    ('{"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, False),
    ('{"w":{"dtype":"F32","dtyp\\u0065":"F32","shape":[1],"data_offsets":[0,4]}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}', 4, False),
    ('{"w\\ud800":%s}' % W, 4, False),                                      # a lone surrogate in a name
    ('{"w\\udc00":%s}' % W, 4, False),
    ('{"__metadata__":{"a":"\\ud800"},"w":%s}' % W, 4, False),              # ... in a metadata value
    ('{"w":{"dtype":"F32","x":"\\ud800","shape":[1],"data_offsets":[0,4]}}', 4, False),  # ... anywhere
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[1,-0],"data_offsets":[0,0]}}', 0, False),
    ('{"w":{"dtype":"F32","x":1e400,"shape":[1],"data_offsets":[0,4]}}', 4, False),
    ('{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]},"w":%s}' % W, 4, False),  # each value is read
    ('{"w":1,"w":%s}' % W, 4, False),
    ('{"__metadata__":{"a":1,"a":"x"},"w":%s}' % W, 4, False),
    ('{"w":{"dtype":"F32","x":%s,"shape":[1],"data_offsets":[0,4]}}' % ("[" * 126 + "]" * 126), 4, False),  # 128 deep
    ('{"w":{"dtype":"F32","x":[{"y":%s}],"shape":[1],"data_offsets":[0,4]}}' % ("[" * 124 + "]" * 124), 4, False),
    ('{"w":{"dtype":"F32","x":%s,"x":1,"shape":[1],"data_offsets":[0,4]}}' % ("[" * 126 + "]" * 126), 4, False),
    ('{"w":{"dtype":"F32","x":%s,"shape":[1],"data_offsets":[0,4]},"w":%s}' % ("[" * 126 + "]" * 126, W), 4, False),
    # What the library accepts: the last of a tensor or metadata key given twice, an unknown field
    # twice, a surrogate pair, -0 where nothing reads it, an escaped NUL.
    ('{"w":%s,"w":%s}' % (W, W), 4, True),
    ('{"__metadata__":{"a":"b","a":"c"},"w":%s}' % W, 4, True),
    ('{"w":{"dtype":"F32","x":1,"x":2,"shape":[1],"data_offsets":[0,4]}}', 4, True),
    ('{"w\\ud83d\\ude00":%s}' % W, 4, True),
    ('{"w":{"dtype":"F32","x":-0,"shape":[1],"data_offsets":[0,4]}}', 4, True),
    ('{"layer-0":%s}' % W, 4, True),
    ('{"w\\u0000":%s}' % W, 4, True),
    ('{"w":{"dtype":"F32","x":%s,"shape":[1],"data_offsets":[0,4]}}' % ("[" * 125 + "]" * 125), 4, True),  # 127 deep
    ('{"w":{"dtype":"F32","x":[{"y":%s}],"shape":[1],"data_offsets":[0,4]}}' % ("[" * 123 + "]" * 123), 4, True),
]


def blob(text: str, data_len: int) -> bytes:
    header = text.encode()
    return struct.pack("<Q", len(header)) + header + bytes(data_len)


def accepted(path, data: bytes) -> bool:
    path.write_bytes(data)
    try:
        check_safetensors(path)
    except ModelError:
        return False
    return True


@pytest.mark.parametrize("text,data_len,library", HEADERS)
def test_headers_are_judged_as_the_library_judges_them(tmp_path, text, data_len, library):
    assert accepted(tmp_path / "model.safetensors", blob(text, data_len)) is library


@pytest.mark.parametrize("text,data_len,library", HEADERS)
def test_the_judgements_above_are_the_librarys(text, data_len, library):
    safetensors = pytest.importorskip("safetensors", reason="the [torch] extra installs safetensors")
    try:
        safetensors.deserialize(blob(text, data_len))
    except safetensors.SafetensorError:
        assert not library
    else:
        assert library


@pytest.mark.parametrize("text,message", [
    ('{"__metadata__":{},"__metadata__":{},"w":%s}' % W, "gives __metadata__ twice"),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[0,4]}}', "'w' gives data_offsets twice"),
    ('{"w\\ud800":%s}' % W, "not valid JSON: .*surrogate"),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', "malformed shape or offsets"),
])
def test_the_errors_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob(text, 4))
    with pytest.raises(ModelError, match=message):
        check_safetensors(path)
