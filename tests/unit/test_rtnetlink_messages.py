"""The rtnetlink messages the local backend sends, checked byte for byte
against the layouts of <linux/rtnetlink.h> and <linux/if_link.h>, and the
parsing of the kernel's answers (acks, errors with an extended-ack text).
The requests themselves are tried on a real kernel in
tests/integration/test_rtnetlink.py and test_network.py."""

from __future__ import annotations

import struct

from orchestrator_service.backends.local import rtnetlink as rt


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of a run of rtattrs; checks each is 4-byte aligned."""
    out, offset = [], 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        assert length >= 4
        out.append((kind, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    assert offset == len(data)
    return out


def test_veth_request_nests_the_peer_in_linkinfo() -> None:
    body = rt.veth_request("sh-abc", mac="02:5a:0a:58:00:01", group=0x12345, peer_name="eth0",
                           peer_mac="02:5a:0a:58:00:02", peer_netns_fd=42)
    family, kind, index, flags, change = struct.unpack_from("=BxHiII", body)
    assert (family, kind, index, flags, change) == (0, 0, 0, 0, 0)  # created down
    top = dict(attrs(body[16:]))
    assert top[rt.IFLA_IFNAME] == b"sh-abc\0"
    assert top[rt.IFLA_ADDRESS] == bytes([2, 0x5a, 10, 0x58, 0, 1])
    assert top[rt.IFLA_GROUP] == struct.pack("=I", 0x12345)
    info = dict(attrs(top[rt.IFLA_LINKINFO]))
    assert info[rt.IFLA_INFO_KIND] == b"veth"
    peer = dict(attrs(info[rt.IFLA_INFO_DATA]))[rt.VETH_INFO_PEER]
    assert peer[:16] == bytes(16)  # the peer's ifinfomsg
    peer_attrs = dict(attrs(peer[16:]))
    assert peer_attrs == {rt.IFLA_IFNAME: b"eth0\0", rt.IFLA_ADDRESS: bytes([2, 0x5a, 10, 0x58, 0, 2]),
                          rt.IFLA_NET_NS_FD: struct.pack("=I", 42)}


def test_link_up_request_sets_alias_noarp_and_up_in_one_message() -> None:
    body = rt.link_up_request(9, alias="sandhub:br:cnt-1", noarp=True)
    _, _, index, flags, change = struct.unpack_from("=BxHiII", body)
    assert (index, flags, change) == (9, rt.IFF_UP | rt.IFF_NOARP, rt.IFF_UP | rt.IFF_NOARP)
    top = dict(attrs(body[16:]))
    assert top == {rt.IFLA_IFALIAS: b"sandhub:br:cnt-1"}  # no NUL: the kernel keeps the bytes as given


def test_address_route_and_neighbour_requests() -> None:
    body = rt.address_request(3, "10.88.0.2", 16)
    assert struct.unpack_from("=BBBBI", body) == (2, 16, 0, 0, 3)  # AF_INET, /16, index 3
    assert dict(attrs(body[8:])) == {rt.IFA_LOCAL: bytes([10, 88, 0, 2]), rt.IFA_ADDRESS: bytes([10, 88, 0, 2])}
    body = rt.address_request(3, "10.88.0.2", 32, peer="10.88.0.1")  # point-to-point
    assert dict(attrs(body[8:])) == {rt.IFA_LOCAL: bytes([10, 88, 0, 2]), rt.IFA_ADDRESS: bytes([10, 88, 0, 1])}
    body = rt.default_route_request("10.88.0.1", 3)
    family, dst_len, _, _, table, protocol, scope, kind, _ = struct.unpack_from("=BBBBBBBBI", body)
    assert (family, dst_len, table, protocol, scope, kind) == (2, 0, 254, 3, 0, 1)
    assert dict(attrs(body[12:])) == {rt.RTA_GATEWAY: bytes([10, 88, 0, 1]), rt.RTA_OIF: struct.pack("=I", 3)}
    body = rt.host_route_request("10.88.0.2", 7, source="10.88.0.1")
    family, dst_len, _, _, table, protocol, scope, kind, _ = struct.unpack_from("=BBBBBBBBI", body)
    assert (family, dst_len, table, protocol, scope, kind) == (2, 32, 254, 3, 253, 1)  # scope link
    assert dict(attrs(body[12:])) == {rt.RTA_DST: bytes([10, 88, 0, 2]), rt.RTA_OIF: struct.pack("=I", 7),
                                      rt.RTA_PREFSRC: bytes([10, 88, 0, 1])}
    body = rt.neighbour_request("10.88.0.2", "02:5a:0a:58:00:02", 7)
    assert struct.unpack_from("=BxxxiHBB", body) == (2, 7, rt.NUD_PERMANENT, 0, 1)
    assert dict(attrs(body[12:])) == {rt.NDA_DST: bytes([10, 88, 0, 2]),
                                      rt.NDA_LLADDR: bytes([2, 0x5a, 10, 0x58, 0, 2])}


def error_message(seq: int, error: int, text: str = "") -> bytes:
    request_header = struct.pack("=IHHII", 16, rt.RTM_NEWLINK, 5, seq, 0)
    tlvs = rt.attr(rt.NLMSGERR_ATTR_MSG, text.encode() + b"\0") if text else b""
    body = struct.pack("=i", error) + request_header + tlvs
    flags = rt.NLM_F_CAPPED | (rt.NLM_F_ACK_TLVS if text else 0)
    return struct.pack("=IHHII", 16 + len(body), rt.NLMSG_ERROR, flags, seq, 0) + body


def test_the_kernels_reason_is_found_whether_or_not_the_request_was_echoed() -> None:
    request = struct.pack("=IHHII", 24, rt.RTM_NEWLINK, 5, 9, 0) + b"\x01" * 8  # header + an 8-byte body
    tlvs = rt.attr(rt.NLMSGERR_ATTR_MSG, b"Invalid argument here\0")
    body = struct.pack("=i", -22) + request + tlvs
    uncapped = struct.pack("=IHHII", 16 + len(body), rt.NLMSG_ERROR, rt.NLM_F_ACK_TLVS, 9, 0) + body
    assert rt.parse_ack(uncapped, 9) == (22, "Invalid argument here")


def test_parse_ack_finds_the_answer_to_its_request() -> None:
    assert rt.parse_ack(error_message(7, 0), 7) == (0, "")
    assert rt.parse_ack(error_message(7, -17, "Device already exists"), 7) == (17, "Device already exists")
    assert rt.parse_ack(error_message(6, -1), 7) is None  # a late answer to another request
    assert rt.parse_ack(error_message(6, 0) + error_message(7, -19), 7) == (19, "")
    assert rt.parse_ack(b"\x00" * 8, 7) is None  # truncated: nothing to read
