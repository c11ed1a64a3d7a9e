"""helloworld's messages without generated code: HelloRequest{string name = 1}
and HelloReply{string message = 1} are one length-delimited string field, so
one encoder and one decoder serve both (used by the grpcio client and the
grpcio backend of the interop tests)."""


def encode(value):
    """The message whose field 1 is the string `value`."""
    data = value.encode()
    out = bytearray(b"\x0a")
    n = len(data)
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            break
    return bytes(out) + data


def decode(raw):
    """Field 1 of the message `raw`, as a string ("" for an empty message)."""
    if not raw:
        return ""
    assert raw[0] == 0x0A, raw
    length, i, shift = 0, 1, 0
    while True:
        b = raw[i]
        length |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            break
        shift += 7
    return raw[i : i + length].decode()
