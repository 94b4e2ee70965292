"""Reading JSON and JSONL data files one record at a time, with bounded memory.

A record is a JSONL line, an element of a JSON list, or the one object of a file that holds a single sample.
Each is size-checked before it is parsed: a record over `max_bytes` is a bad sample (its bytes are skipped,
never held whole), so memory stays near `max_bytes` plus one read chunk whatever the file holds. A JSON list
is streamed element by element (json's own C decoder on a sliding window), so a 1 GB LLaVA-Instruct file is
read without loading it whole either.

Per-record problems come back as a DataError in place of the record (the caller skips or raises it, as
`on_bad_sample` says): over max_bytes, bytes that are not UTF-8 (named by byte offset in the file), a key
given twice in one JSON object (json would keep the last value without a word), a malformed JSONL line.
Problems with the file's structure (a malformed JSON list) raise: after them no record can be trusted.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from mixtune.errors import DataError

DEFAULT_MAX_SAMPLE_BYTES = 16 * 1024 * 1024  # a sample with a few base64 images fits; a runaway line does not
CHUNK = 1 << 20
NEAR_END = 64  # a decode error this close to the window's end may only mean the record continues past it

_NON_SPACE = re.compile(r"[^ \t\r\n]")
_SURROGATE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, kept by errors="surrogateescape"
_STRUCTURE = re.compile(r'["\[\]{}]')
_IN_STRING = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[,\]}\s]")


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object_without_duplicates(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


STRICT = json.JSONDecoder(object_pairs_hook=_object_without_duplicates)
PLAIN = json.JSONDecoder()


def duplicate_key_error(key: str, **where) -> DataError:
    return DataError("key given twice in one JSON object (JSON would keep only the last value)", field=key, **where)


def too_big_error(size: str, max_bytes: int, **where) -> DataError:
    return DataError(f"sample is {size} bytes, over max_sample_bytes ({max_bytes}); raise max_sample_bytes "
                     "(top-level or per dataset entry) to read it", **where)


def not_utf8_error(byte: int, offset: int, **where) -> DataError:
    return DataError(f"not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} of the file (re-encode the file "
                     "as UTF-8)", **where)


def iter_records(path: str, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES, chunk: int = CHUNK,
                 jsonl: bool | None = None) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (index, line, record or DataError) for each record of a JSON or JSONL file.

    `jsonl` None: a `.jsonl` name, or a file whose text starts with '{' and has a line starting with '{',
    is read as JSONL (one record per line); anything else as one JSON document."""
    if os.path.isdir(path):
        raise DataError("is a folder, not a data file; point data_files at the files inside it (a glob such as "
                        f"{os.path.join(path, '*.jsonl')} works)", file=path)
    if jsonl is None:
        jsonl = path.endswith(".jsonl") or _looks_like_jsonl(path, chunk)
    yield from (_jsonl_records(path, max_bytes, chunk) if jsonl else _json_records(path, max_bytes, chunk))


def _looks_like_jsonl(path: str, chunk: int) -> bool:
    with open(path, "rb") as f:
        head = f.read(chunk)
        stripped = head.removeprefix(codecs.BOM_UTF8).lstrip()
        if not stripped.startswith(b"{"):
            return False
        tail = b""
        data = stripped
        while data:
            if b"\n{" in tail + data:
                return True
            tail, data = data[-1:], f.read(chunk)
    return False


def _jsonl_records(path: str, max_bytes: int, chunk: int):
    with open(path, "rb") as f:
        offset, index, line_no = 0, 0, 0
        while True:
            raw = f.readline(max_bytes + 2)  # never more than the limit (plus "\r\n") in memory
            if not raw:
                return
            line_no += 1
            start, size = offset, len(raw)
            offset += size
            if not raw.endswith(b"\n") and size == max_bytes + 2:
                while not raw.endswith(b"\n"):  # skip the rest of the line, a chunk at a time
                    raw = f.readline(chunk)
                    if not raw:
                        break
                    size += len(raw)
                    offset += len(raw)
                yield index, line_no, too_big_error(str(size), max_bytes, file=path, line=line_no, index=index)
                index += 1
                continue
            content = raw.rstrip(b"\r\n")
            if line_no == 1 and content.startswith(codecs.BOM_UTF8):
                content, start = content[3:], start + 3
            if not content.strip():
                continue
            where = dict(file=path, line=line_no, index=index)
            index += 1
            if len(content) > max_bytes:
                yield where["index"], line_no, too_big_error(str(len(content)), max_bytes, **where)
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where["index"], line_no, not_utf8_error(content[e.start], start + e.start, **where)
                continue
            yield where["index"], line_no, _decode_line(text, where)


def _decode_line(text: str, where: dict) -> Any:
    try:
        return STRICT.decode(text)
    except json.JSONDecodeError as e:
        return DataError(f"malformed JSON line: {e.msg} (column {e.colno})", **where)
    except DuplicateKey as e:
        return duplicate_key_error(e.key, **where)
    except RecursionError:
        return DataError("malformed JSON line: nested too deeply", **where)


class _Window:
    """The not yet consumed text of a file, read forward in chunks; consumed text is dropped, and what was
    dropped is counted so that errors can still name lines and byte offsets."""

    def __init__(self, f, chunk: int):
        self.f, self.chunk = f, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        self.dropped_bytes = self.dropped_lines = self.dropped_col = 0

    def more(self, size: int | None = None) -> bool:
        if self.eof:
            return False
        data = self.f.read(max(size or 0, self.chunk))
        self.buf += self.decoder.decode(data, final=not data)
        if not data:
            self.eof = True
        if self.dropped_bytes == 0 and self.pos == 0 and self.buf.startswith("\ufeff"):
            self.pos = 1  # a UTF-8 byte order mark
        return True

    def drop_consumed(self, force: bool = False) -> None:
        if self.pos > self.chunk or (force and self.pos):
            gone = self.buf[: self.pos]
            self.dropped_bytes += len(gone.encode("utf-8", "surrogateescape"))
            newlines = gone.count("\n")
            self.dropped_col = len(gone) - gone.rfind("\n") - 1 if newlines else self.dropped_col + len(gone)
            self.dropped_lines += newlines
            self.buf, self.pos = self.buf[self.pos:], 0

    def next_char(self) -> str | None:
        """Move to the next non-whitespace character and return it (None at the end of the file)."""
        while True:
            m = _NON_SPACE.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            self.drop_consumed()
            if not self.more():
                return None

    def line(self, pos: int) -> int:
        return self.dropped_lines + self.buf.count("\n", 0, pos) + 1

    def column(self, pos: int) -> int:
        start = self.buf.rfind("\n", 0, pos) + 1
        return pos - start + 1 + (self.dropped_col if start == 0 else 0)

    def byte_offset(self, pos: int) -> int:
        return self.dropped_bytes + len(self.buf[:pos].encode("utf-8", "surrogateescape"))

    def malformed(self, path: str, msg: str, pos: int) -> DataError:
        m = _SURROGATE.match(self.buf, pos)
        if m:
            return not_utf8_error(ord(m.group()) - 0xDC00, self.byte_offset(pos), file=path, line=self.line(pos))
        return DataError(f"malformed JSON: {msg} (column {self.column(pos)})", file=path, line=self.line(pos))


def _json_records(path: str, max_bytes: int, chunk: int):
    with open(path, "rb") as f:
        w = _Window(f, chunk)
        w.more()
        first = w.next_char()
        if first is None:
            raise DataError("malformed JSON: the file holds no JSON value (it is empty)", file=path)
        if first != "[":  # one sample in the file, or a value that is no sample at all
            record = _next_value(w, path, max_bytes, 0)
            if w.next_char() is not None:
                raise w.malformed(path, "Extra data", w.pos)
            if isinstance(record, DataError) or isinstance(record, dict):
                yield 0, None, record
                return
            raise DataError(f"expected a JSON list of samples, got {type(record).__name__}", file=path)
        w.pos += 1
        if w.next_char() == "]":
            w.pos += 1
        else:
            index = 0
            while True:
                yield index, None, _next_value(w, path, max_bytes, index)
                index += 1
                ch = w.next_char()
                if ch == "]":
                    w.pos += 1
                    break
                if ch != ",":
                    raise (w.malformed(path, "Expecting ',' delimiter", w.pos) if ch is not None else
                           DataError("malformed JSON: the file ends inside the list", file=path,
                                     line=w.line(w.pos)))
                w.pos += 1
                if w.next_char() in ("]", None):
                    raise w.malformed(path, "Expecting value", w.pos)
                w.drop_consumed()
        if w.next_char() is not None:
            raise w.malformed(path, "Extra data", w.pos)


def _next_value(w: _Window, path: str, max_bytes: int, index: int) -> Any:
    """Decode the value at the window's position and move past it; per-record problems are returned."""
    where = dict(file=path, index=index)
    while True:
        start = w.pos
        duplicate = None
        try:
            try:
                value, end = STRICT.raw_decode(w.buf, start)
            except DuplicateKey as e:
                duplicate = e.key
                value, end = PLAIN.raw_decode(w.buf, start)  # only to find where the record ends
            if end == len(w.buf) and not w.eof:  # a number may continue in the next chunk
                w.more()
                continue
        except json.JSONDecodeError as e:
            incomplete = e.pos >= len(w.buf) - NEAR_END or e.msg.startswith("Unterminated string")
            if w.eof or not incomplete:
                raise w.malformed(path, e.msg, e.pos) from None
            if len(w.buf) - start > max_bytes:  # characters: the bytes are at least as many
                begin = w.byte_offset(start)
                _skip_value(w, path)
                return too_big_error(str(w.byte_offset(w.pos) - begin), max_bytes, **where)
            w.more(len(w.buf) - start)  # doubling, so a large record is re-decoded only a few times
            continue
        except RecursionError:
            raise DataError("malformed JSON: nested too deeply", file=path, line=w.line(start)) from None
        w.pos = end
        if end - start > max_bytes // 4:
            size = len(w.buf[start:end].encode("utf-8", "surrogateescape"))
            if size > max_bytes:
                return too_big_error(str(size), max_bytes, **where)
        bad_byte = _SURROGATE.search(w.buf, start, end)
        if bad_byte:
            return not_utf8_error(ord(bad_byte.group()) - 0xDC00, w.byte_offset(bad_byte.start()), **where)
        if duplicate is not None:
            return duplicate_key_error(duplicate, **where)
        return value


def _skip_value(w: _Window, path: str) -> None:
    """Move past the value at the window's position without decoding it (it is too big to hold)."""
    pos = w.pos
    if w.buf[pos] not in '[{"':
        pattern, depth, in_string = _SCALAR_END, 0, False
    else:
        pattern, depth, in_string = None, 0, False
    while True:
        buf = w.buf
        if pattern is _SCALAR_END:
            m = _SCALAR_END.search(buf, pos)
            if m:
                w.pos = m.start()
                return
            pos = len(buf)
        elif in_string:
            m = _IN_STRING.search(buf, pos)
            if m is None:
                pos = len(buf)
            elif m.group() == "\\":
                if m.end() < len(buf):
                    pos = m.end() + 1
                    continue
                pos = m.start()  # the escaped character is in the next chunk
            else:
                in_string, pos = False, m.end()
                if depth == 0:
                    w.pos = pos
                    return
                continue
        else:
            m = _STRUCTURE.search(buf, pos)
            if m is None:
                pos = len(buf)
            else:
                pos = m.end()
                ch = m.group()
                if ch == '"':
                    in_string = True
                elif ch in "[{":
                    depth += 1
                else:
                    depth -= 1
                    if depth == 0:
                        w.pos = pos
                        return
                continue
        w.pos = pos
        w.drop_consumed(force=True)
        pos = w.pos
        if not w.more():
            raise DataError("malformed JSON: the file ends inside a sample", file=path, line=w.line(pos))


def load_document(path: str) -> Any:
    """A whole JSON document (a COCO annotation file: one object holding every sample), UTF-8 checked."""
    if os.path.isdir(path):
        raise DataError("is a folder, not a data file", file=path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8_error(data[e.start], e.start, file=path) from None
    del data
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None
    except RecursionError:
        raise DataError("malformed JSON: nested too deeply", file=path) from None
