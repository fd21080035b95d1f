#!/bin/busybox sh
# PID 1 of the test guest. It brings up what a distribution's early boot
# does for USB serial adapters (udevd, then the drivers), then serves the
# test's shell on ttyS1; ttyS0 is the kernel console, which the host logs.
#
# The shell reads one line at a time from ttyS1 and evaluates it. The host
# sends each script as `( eval "$(echo BASE64 | base64 -d)" ) </dev/null`
# followed by a marker that prints its number and the script's status
# (see shell.rs). Scripts run in subshells, so `exit` and `set -e` in them
# never end PID 1.

/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp

say() { echo "init: $* (uptime $(cut -d' ' -f1 /proc/uptime) s)"; }
say started

# udevd first, so every adapter the drivers find reaches it as an event,
# as after a hotplug; the rules load the drivers too (80-drivers.rules).
/lib/systemd/systemd-udevd --daemon || say "systemd-udevd did not start"
while read -r m; do
    modprobe "$m" || say "modprobe $m failed"
done < /etc/hw-tests/modules
say "drivers loaded"

# wait_path PATH [MS]: until PATH exists (a link, even dangling, counts);
# wait_gone PATH [MS]: until it no longer does. Each fails saying what it
# waited for after MS milliseconds (default 10000).
wait_path() { wait_until present "$1" "${2:-10000}"; }
wait_gone() { wait_until gone "$1" "${2:-10000}"; }
wait_until() {
    n=$(( $3 / 10 ))
    while :; do
        if [ -e "$2" ] || [ -L "$2" ]; then now=present; else now=gone; fi
        [ "$now" = "$1" ] && return 0
        n=$((n - 1))
        if [ "$n" -le 0 ]; then
            echo "timed out after $3 ms waiting for $2 to be $1"
            return 1
        fi
        usleep 10000
    done
}

stty -F /dev/ttyS1 raw -echo
say "shell on ttyS1"
# Each line in a subshell: a line cut short while the port came up is a
# syntax error, which ends a non-interactive shell, and this one is PID 1.
while IFS= read -r line; do
    ( eval "$line" )
done < /dev/ttyS1 > /dev/ttyS1 2>&1
say "the shell's channel closed; powering off"
poweroff -f
