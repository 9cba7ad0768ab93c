#!/bin/busybox sh
# A stand-in /init for the microVM guest image: it brings the guest up the way the
# agent will (file systems, modules in their recorded order), reports readiness on the
# virtio-serial port and on the serial console, and powers the guest off. It measures
# boot time and checks the image; it is not the agent.
#
# Applets are called by name: this busybox's shell runs them without executing
# /bin/<applet> (the image has none), through /proc/self/exe, so /proc comes first.
export PATH=/bin

/bin/busybox mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Parameters on the kernel command line ("name.param=value") reach built-in code only:
# the ones meant for a module are handed to its insmod.
read -r cmdline </proc/cmdline
params_of() {
    for word in $cmdline; do
        case "$word" in
            "$1".*) printf '%s ' "${word#"$1".}" ;;
        esac
    done
}

while read -r ko; do
    name="${ko%.ko}"
    params=""
    case " $cmdline" in
        *" $name."*) params="$(params_of "$name")" ;;
    esac
    # shellcheck disable=SC2086 # the parameters are separate words
    insmod "/lib/modules/$ko" $params ||
        echo "guest-test-init: insmod $ko failed" >/dev/console
done </lib/modules/load-order

# The host announces its ports after the driver is bound, so the device node appears a
# little later, and opening it fails with ENXIO for a moment after it appears.
sent=""
tries=0
while [ -z "$sent" ] && [ "$tries" -lt 200 ]; do
    for dev in /dev/vport*p* /dev/hvc0; do
        [ -c "$dev" ] || continue
        read -r uptime _ </proc/uptime
        if { echo "KUASAR-GUEST-READY uptime=$uptime port=$dev" >"$dev"; } 2>/dev/null; then
            sent="$dev"
            break
        fi
    done
    [ -n "$sent" ] || { usleep 10000; tries=$((tries + 1)); }
done

line="KUASAR-GUEST-READY uptime=${uptime:-} port=${sent:-none}"
if [ -c /dev/ttyS0 ]; then
    echo "$line" >/dev/ttyS0
else
    echo "$line" >/dev/console
fi

poweroff -f
