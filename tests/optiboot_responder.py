#!/usr/bin/env python3
"""An Arduino Uno (ATmega328P with optiboot) for tests, on the board side
of a port (fd 3), behind the Uno's auto-reset circuit: fd 4 tells each
change of the adapter's DTR and RTS ("MONOTONIC_NS DTR RTS" lines).

A capacitor couples DTR# to RESET: asserting DTR (DTR# falls) resets the
chip, as on the board. After a reset optiboot runs; it answers STK500v1
while commands keep coming and starts the sketch after WATCHDOG of silence
(optiboot's watchdog timeout) or on LEAVE_PROGMODE. The sketch ignores what
it receives, so `avrdude -c arduino` only gets in sync after a DTR pulse
of its own shortly before it asks.

Implemented: GET_SYNC, GET_PARAMETER, SET_DEVICE(_EXT), ENTER/LEAVE_PROGMODE,
LOAD_ADDRESS, UNIVERSAL, PROG_PAGE, READ_PAGE (flash), READ_SIGN. Boots and
requests are logged to argv[1] ("reset", "optiboot", "sketch", "sync",
"prog_page 0x0000 128", ...).

usage: optiboot_responder.py LOG
"""

import os
import select
import sys
import time

FD, EDGES = 3, 4
WATCHDOG = 3.0
INSYNC, OK, EOP = 0x14, 0x10, 0x20
SIGNATURE = bytes([0x1E, 0x95, 0x0F])  # ATmega328P
# Bytes of argument each command takes before CRC_EOP.
ARGS = {0x30: 0, 0x41: 1, 0x42: 20, 0x45: 5, 0x50: 0, 0x51: 0, 0x55: 2, 0x56: 4, 0x75: 0}


def main():
    log = open(sys.argv[1], "a", buffering=1)

    def note(*words):
        log.write(" ".join(str(w) for w in words) + "\n")

    flash = bytearray(b"\xff" * 32768)
    chip = {"mode": "sketch", "dtr": False, "deadline": 0.0, "addr": 0}
    buf = bytearray()

    def send(b):
        view = memoryview(bytes(b))
        while view:
            view = view[os.write(FD, view):]

    def reset():
        chip["mode"] = "optiboot"
        chip["deadline"] = time.monotonic() + WATCHDOG
        buf.clear()
        note("reset")

    def need(n):
        # Whole command: its byte, n argument bytes, CRC_EOP.
        return len(buf) >= 1 + n + 1

    def command():
        """Handles the command at the start of buf if it is whole; returns
        whether one was consumed."""
        op = buf[0]
        if op in ARGS:
            n = ARGS[op]
        elif op == 0x64:  # PROG_PAGE: len_hi len_lo memtype data...
            if len(buf) < 4:
                return False
            n = 3 + (buf[1] << 8 | buf[2])
        elif op == 0x74:  # READ_PAGE: len_hi len_lo memtype
            n = 3
        else:
            note("unknown", hex(op))
            del buf[:1]
            return True
        if not need(n):
            return False
        args, eop = bytes(buf[1 : 1 + n]), buf[1 + n]
        del buf[: 2 + n]
        if eop != EOP:
            note("no_eop", hex(op))
            send([0x15])  # STK_NOSYNC
            return True
        chip["deadline"] = time.monotonic() + WATCHDOG
        out = b""
        if op == 0x30:
            note("sync")
        elif op == 0x41:
            out = bytes([{0x80: 3, 0x81: 8, 0x82: 3}.get(args[0], 3)])
        elif op == 0x55:
            chip["addr"] = (args[0] | args[1] << 8) * 2
        elif op == 0x56:
            out = b"\x00"
        elif op == 0x64:
            size = args[0] << 8 | args[1]
            data = args[3:]
            a = chip["addr"]
            if args[2] == ord("F"):
                flash[a : a + size] = data
            note("prog_page", f"{a:#06x}", size)
        elif op == 0x74:
            size = args[0] << 8 | args[1]
            a = chip["addr"]
            out = bytes(flash[a : a + size])
            note("read_page", f"{a:#06x}", size)
        elif op == 0x75:
            out = SIGNATURE
            note("read_sign")
        send(bytes([INSYNC]) + out + bytes([OK]))
        if op == 0x51:
            note("leave")
            chip["mode"] = "sketch"
            note("sketch")
        return True

    def edge(dtr):
        if chip["dtr"] is False and dtr:
            reset()
        chip["dtr"] = dtr

    note("ready")
    edge_text = b""
    while True:
        wait = 1.0
        if chip["mode"] == "optiboot":
            wait = max(0.0, chip["deadline"] - time.monotonic())
        ready = select.select([FD, EDGES], [], [], wait)[0]
        if EDGES in ready:
            edge_text += os.read(EDGES, 4096)
            *lines, edge_text = edge_text.split(b"\n")
            for l in lines:
                _t, dtr, _rts = (int(x) for x in l.split())
                edge(bool(dtr))
        if chip["mode"] == "optiboot" and time.monotonic() >= chip["deadline"]:
            chip["mode"] = "sketch"
            note("sketch")
        if FD not in ready:
            continue
        try:
            chunk = os.read(FD, 4096)
        except OSError:
            time.sleep(0.05)
            continue
        if not chunk:
            time.sleep(0.05)
            continue
        if chip["mode"] != "optiboot":
            continue
        buf.extend(chunk)
        while buf and command():
            pass


if __name__ == "__main__":
    main()
