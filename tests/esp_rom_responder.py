#!/usr/bin/env python3
"""A tiny ESP32 serial bootloader for tests: it sits on the board side of a
fake board (a pty master, inherited as fd 3) and answers esptool the way an
ESP32's ROM loader and, after the stub upload, the flasher stub do.

It speaks SLIP-framed requests and replies (`<BBHI` header: direction, op,
length, value; then data ending in the status bytes: 4 in the ROM, 2 in the
stub) and keeps a small register file:

- SYNC answers 8 times with the ROM's non-zero value;
- READ_REG/WRITE_REG read and write the register file, which starts with an
  ESP32-D0WD's chip-detect magic, eFuse words (MAC, package, revision) and
  UART clock divider (40 MHz crystal);
- writing SPI_CMD_REG's USR bit runs the SPI flash command in SPI_USR2_REG
  (RDID answers a 4 MB Winbond) and clears the bit, as the hardware does;
- MEM_BEGIN/MEM_DATA/MEM_END take the stub and the stub then says "OHAI";
- CHANGE_BAUDRATE is acked at the old rate (the new rate is the host's to set
  on the port; a pty master can't see line rates);
- SPI_ATTACH, SPI_SET_PARAMS are acked; anything else gets the ROM's
  "invalid command" status (1, 5), so esptool says what it wanted.

- FLASH_DEFL_BEGIN/DATA/END write a compressed image into a 4 MB flash
  (the stub's way), FLASH_BEGIN/DATA/END an uncompressed one, and
  SPI_FLASH_MD5 answers the MD5 of a region, so `write-flash` verifies.

Every request is logged to the file named by argv[1], one line each
("sync", "read_reg 0x3ff5a004", "change_baudrate 460800 115200", "stub"...).

With EDGES_FD, the chip sits behind the classic two-transistor auto-reset
circuit of ESP32 boards, and EDGES_FD tells each change of the adapter's
DTR and RTS ("MONOTONIC_NS DTR RTS" lines): EN is low while RTS is asserted
and DTR is not, IO0 is low while DTR is asserted and RTS is not. The chip is
held in reset while EN is low and samples IO0 when EN has been high for
EN_DELAY (the RC on EN): low, it runs the ROM loader and answers; high, it
boots its firmware, prints its boot text and ignores every request. It
starts running its firmware. Boots are logged ("boot download", "boot
firmware"). Without EDGES_FD it is in the ROM loader from the start.

usage: esp_rom_responder.py LOG [MAC] [EDGES_FD]   (MAC like 24:0a:c4:12:34:56)
"""

import hashlib
import os
import select
import struct
import sys
import time
import zlib

FD = 3

SYNC, WRITE_REG, READ_REG = 0x08, 0x09, 0x0A
MEM_BEGIN, MEM_END, MEM_DATA = 0x05, 0x06, 0x07
SPI_SET_PARAMS, SPI_ATTACH, CHANGE_BAUDRATE = 0x0B, 0x0D, 0x0F
FLASH_BEGIN, FLASH_DATA, FLASH_END = 0x02, 0x03, 0x04
FLASH_DEFL_BEGIN, FLASH_DEFL_DATA, FLASH_DEFL_END, SPI_FLASH_MD5 = 0x10, 0x11, 0x12, 0x13
FLASH_SIZE = 4 * 1024 * 1024
# How long EN must be high before the chip samples IO0: the RC on EN
# (10 kOhm and 1 uF on common dev boards: ~10 ms to the threshold).
EN_DELAY_NS = 10_000_000

EFUSE = 0x3FF5A000
SPI_BASE = 0x3FF42000
SPI_CMD_REG = SPI_BASE + 0x00
SPI_USR2_REG = SPI_BASE + 0x24
SPI_W0_REG = SPI_BASE + 0x80
SPI_CMD_USR = 1 << 18


def main():
    log = open(sys.argv[1], "a", buffering=1)
    mac = bytes.fromhex((sys.argv[2] if len(sys.argv) > 2 else "24:0a:c4:12:34:56").replace(":", ""))
    assert len(mac) == 6

    def note(*words):
        log.write(" ".join(str(w) for w in words) + "\n")

    regs = {
        0x40001000: 0x00F01D83,  # CHIP_DETECT_MAGIC_REG: ESP32
        EFUSE + 4 * 0: 0,
        EFUSE + 4 * 1: struct.unpack(">I", mac[2:6])[0],  # MAC low 4 bytes
        EFUSE + 4 * 2: struct.unpack(">H", mac[0:2])[0],  # MAC high 2, CRC 0
        EFUSE + 4 * 3: (1 << 15) | (1 << 9),  # rev bit 0; package 1 (D0WD)
        EFUSE + 4 * 4: 0,
        EFUSE + 4 * 5: 0,  # minor revision 0, SPI pads default
        EFUSE + 4 * 6: 0,  # coding scheme None
        0x3FF6607C: 0x16042000,  # APB_CTL_DATE: rev bit 2 clear -> v1.0
        0x3FF40014: 347,  # UART_CLKDIV at 115200 -> 40 MHz crystal
    }
    edges_fd = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    state = {"stub": False, "flash_at": 0, "inflate": None}
    flash = bytearray(b"\xff" * FLASH_SIZE)
    # The reset circuit: DTR/RTS as asserted, the chip's mode, and when EN rose.
    chip = {"mode": "rom" if edges_fd < 0 else "app", "dtr": False, "rts": False, "rise": None}

    def reply(op, value=0, data=b"", ok=True, error=0):
        status_len = 2 if state["stub"] else 4
        status = bytes([0 if ok else 1, 0 if ok else error]) + bytes(status_len - 2)
        body = data + status
        send(struct.pack("<BBHI", 1, op, len(body), value) + body)

    def send(packet):
        frame = b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"
        view = memoryview(frame)
        while view:
            view = view[os.write(FD, view) :]

    def spi_run():
        cmd = regs.get(SPI_USR2_REG, 0) & 0xFF
        note("spi_command", hex(cmd))
        if cmd == 0x9F:  # RDID: Winbond (0xEF) W25Q32 (0x40 0x16), 4 MB
            regs[SPI_W0_REG] = 0x1640EF
        else:
            regs[SPI_W0_REG] = 0
        regs[SPI_CMD_REG] = 0

    def handle(pkt):
        if len(pkt) < 8:
            return
        direction, op, size, chk = struct.unpack("<BBHI", pkt[:8])
        data = pkt[8 : 8 + size]
        if direction != 0:
            return
        if chip["mode"] != "rom":
            note("ignored", hex(op), "in", chip["mode"])
            return
        if op == SYNC:
            # A real chip only syncs after a reset into the ROM loader.
            state["stub"] = False
            note("sync")
            for _ in range(8):
                reply(SYNC, 0x20120707)
        elif op == READ_REG:
            (addr,) = struct.unpack("<I", data[:4])
            note("read_reg", hex(addr))
            reply(READ_REG, regs.get(addr, 0))
        elif op == WRITE_REG:
            for i in range(0, len(data) - len(data) % 16, 16):
                addr, value, mask, _delay = struct.unpack("<IIII", data[i : i + 16])
                note("write_reg", hex(addr), hex(value), hex(mask))
                regs[addr] = (regs.get(addr, 0) & ~mask) | (value & mask)
                if addr == SPI_CMD_REG and value & SPI_CMD_USR:
                    spi_run()
            reply(WRITE_REG)
        elif op == MEM_BEGIN:
            size_, blocks, blocksize, offset = struct.unpack("<IIII", data[:16])
            note("mem_begin", hex(offset), size_)
            reply(MEM_BEGIN)
        elif op == MEM_DATA:
            note("mem_data", len(data))
            reply(MEM_DATA)
        elif op == MEM_END:
            flag, entry = struct.unpack("<II", data[:8])
            note("mem_end", flag, hex(entry))
            reply(MEM_END)
            if flag == 0:
                time.sleep(0.01)
                state["stub"] = True
                note("stub")
                send(b"OHAI")
        elif op == CHANGE_BAUDRATE:
            new, old = struct.unpack("<II", data[:8])
            note("change_baudrate", new, old)
            reply(CHANGE_BAUDRATE)
        elif op in (FLASH_BEGIN, FLASH_DEFL_BEGIN):
            size, blocks, blocksize, offset = struct.unpack("<IIII", data[:16])
            note("flash_begin" if op == FLASH_BEGIN else "flash_defl_begin", hex(offset), size)
            state["flash_at"] = offset
            state["inflate"] = zlib.decompressobj() if op == FLASH_DEFL_BEGIN else None
            reply(op)
        elif op in (FLASH_DATA, FLASH_DEFL_DATA):
            size, seq = struct.unpack("<II", data[:8])
            block = data[16 : 16 + size]
            if state["inflate"] is not None:
                block = state["inflate"].decompress(block)
            at = state["flash_at"]
            flash[at : at + len(block)] = block
            state["flash_at"] = at + len(block)
            reply(op)
        elif op in (FLASH_END, FLASH_DEFL_END):
            note("flash_end", hex(state["flash_at"]))
            reply(op)
        elif op == SPI_FLASH_MD5:
            addr, size = struct.unpack("<II", data[:8])
            digest = hashlib.md5(flash[addr : addr + size]).digest()
            note("flash_md5", hex(addr), size, digest.hex())
            reply(op, data=digest if state["stub"] else digest.hex().encode())
        elif op in (SPI_ATTACH, SPI_SET_PARAMS):
            note("spi_attach" if op == SPI_ATTACH else "spi_set_params")
            reply(op)
        else:
            note("unsupported", hex(op))
            reply(op, ok=False, error=0x05)

    def boot(download):
        state["stub"] = False
        chip["mode"] = "rom" if download else "app"
        note("boot download" if download else "boot firmware")
        if download:
            send(b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\nwaiting for download\r\n")
        else:
            send(b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\nI (29) boot: ESP-IDF v5.3 2nd stage bootloader\r\nHello from the firmware\r\n")

    def settle(now):
        # EN has been high long enough: the chip samples IO0 (low unless DTR
        # is asserted without RTS) and boots.
        if chip["rise"] is not None and now >= chip["rise"] + EN_DELAY_NS:
            chip["rise"] = None
            boot(download=chip["dtr"] and not chip["rts"])

    def en_high(dtr, rts):
        return not (rts and not dtr)

    def edge(t, dtr, rts):
        note("edge", t, int(dtr), int(rts))
        settle(t)
        was = en_high(chip["dtr"], chip["rts"])
        chip["dtr"], chip["rts"] = dtr, rts
        now = en_high(dtr, rts)
        if was and not now:
            chip["mode"] = "reset"
            chip["rise"] = None
            note("reset")
        elif now and not was:
            chip["rise"] = t

    # fd 3 shares its open file description with the test's fake board:
    # leave it blocking, and read only once select says there is something.
    note("ready")
    buf = bytearray()
    in_frame = False
    escape = False
    edge_text = b""
    while True:
        fds = [FD] + ([edges_fd] if edges_fd >= 0 else [])
        wait = 1.0
        if chip["rise"] is not None:
            wait = max(0.0, (chip["rise"] + EN_DELAY_NS - time.monotonic_ns()) / 1e9)
        ready = select.select(fds, [], [], wait)[0]
        if edges_fd >= 0 and edges_fd in ready:
            edge_text += os.read(edges_fd, 4096)
            *lines, edge_text = edge_text.split(b"\n")
            for l in lines:
                t, dtr, rts = (int(x) for x in l.split())
                edge(t, bool(dtr), bool(rts))
        settle(time.monotonic_ns())
        if FD not in ready:
            continue
        try:
            chunk = os.read(FD, 4096)
        except OSError:
            # EIO: nobody has the tty open; wait for the broker to reopen it.
            time.sleep(0.05)
            continue
        if not chunk:
            time.sleep(0.05)
            continue
        for b in chunk:
            if not in_frame:
                if b == 0xC0:
                    in_frame = True
                    buf.clear()
                continue
            if b == 0xC0:
                if buf:
                    handle(bytes(buf))
                    buf.clear()
                # An empty frame (c0 c0) is the start of the next one.
                continue
            if escape:
                escape = False
                buf.append({0xDC: 0xC0, 0xDD: 0xDB}.get(b, b))
            elif b == 0xDB:
                escape = True
            else:
                buf.append(b)


if __name__ == "__main__":
    main()
