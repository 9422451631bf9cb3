"""``offload-firmware build``: an official Raspberry Pi OS image in, a device image out.

Order of work, so that a refusal costs nothing and the input is never touched:

1. check every input: settings (with the device's own validation), key file,
   policy blob, weak model(s), wheel folder, Edge TPU package, SSH key;
2. read the input image (partition table, release, Python, cloud-init, free
   space on the boot partition) without writing to it, and refuse a payload
   that does not fit;
3. copy the image to a temporary file beside the output, write the payload
   into the copy's FAT boot partition with mtools, read the key documents
   back, and only then rename the copy to the output. Any error removes the
   temporary file, so there is never a half-written output.

What goes on the boot partition (``BOOT`` = ``/boot/firmware`` on the Pi)::

    user-data, network-config        cloud-init (replacing the image's examples)
    offload/firstboot.sh             run once by cloud-init
    offload/device.toml              per-device settings (edit per card)
    offload/device.key               the API key (moved to /etc/offload, 0600)
    offload/ca.pem                   the CA the server's certificate must chain to (--ca-file)
    offload/client.pem, client.key   the device's TLS client certificate and key (optional)
                                     (all three moved to /etc/offload, 0600, at first boot)
    offload/policy.bin               the policy blob
    offload/weak.tflite              the weak model (+ weak_edgetpu.tflite)
    offload/edgetpu/*.deb            the Edge TPU runtime
    offload/wheels/                  our aarch64 wheel + the dependencies' (no sdist)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from firmware import BOOT_DIR, cloudinit, edgetpu, fat, image, settings, tls, wheels
from firmware.tools import FirmwareError, require

__all__ = ["Entry", "build", "DATA_DIR", "data_path"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
#: FAT folder entries and the long-name slots of each file take a little room beyond the clusters.
_DIR_RESERVE_CLUSTERS = 4


def data_path(name):
    """Path of a file shipped in ``firmware/data`` (unit, udev rule, first-boot script)."""
    return os.path.join(DATA_DIR, name)


@dataclass
class Entry:
    """One file for the boot partition: destination path and a local file or the bytes."""

    dest: str
    source: str | None = None
    data: bytes | None = None

    @property
    def size(self):
        return len(self.data) if self.data is not None else os.path.getsize(self.source)


@dataclass
class Plan:
    """Everything decided before the image is touched."""

    entries: list = field(default_factory=list)
    wheel_files: list = field(default_factory=list)
    folders: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _check_tflite(path, what):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FirmwareError(f"{what} {path}: cannot read ({e.strerror})") from None
    if head[4:8] != b"TFL3":
        raise FirmwareError(f"{what} {path}: not a LiteRT (.tflite) model")


def _read_text(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FirmwareError(f"{what} {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _tls_entries(d, ca_file, client_cert, client_key):
    """Boot-partition entries of the checked CA and client certificate/key."""
    if client_key is not None and client_cert is None:
        raise FirmwareError("--client-key needs --client-cert (the certificate of that key)")
    out = {}
    if ca_file is not None:
        out["ca-file"] = tls.check_ca(ca_file)
    if client_cert is not None:
        cert, key = tls.check_client(client_cert, client_key)
        out["client-cert"] = cert
        if key is not None:
            out["client-key"] = key
    return {k: Entry(f"{d}/{tls.FILES[k]}", data=data) for k, data in out.items()}


def _settings(p, settings_file, *, policy, key_file, edgetpu_model, tls_files, allow_plain_http):
    """The settings table for the card, validated as first boot will (notes go to ``p``)."""
    values = settings.load_settings(settings_file) if settings_file else {}
    if allow_plain_http:
        values[tls.ALLOW_PLAIN_HTTP] = True
    settings.validate(values, settings_name=settings_file or "(none given)", policy_path=policy,
                      key_path=key_file, has_edgetpu_model=edgetpu_model is not None,
                      require_server=False, tls_files=tls_files)
    server = values.get("server")
    if isinstance(server, str) and server.startswith("https://") and "ca-file" not in tls_files:
        p.notes.append("no --ca-file: the device checks the server's certificate against the "
                       "system's CA store (right for a public certificate; a private CA such as "
                       "`offload-serve tls init`'s needs --ca-file)")
    return values


def plan(info, *, settings_file=None, key_file=None, wheels_dir, policy=None, model=None,
         edgetpu_model=None, edgetpu_deb=None, admin_user=None, ssh_key=None, wifi_ssid=None,
         wifi_password_file=None, wifi_country=None, ca_file=None, client_cert=None,
         client_key=None, allow_plain_http=False):
    """Validate every input and list what goes on the boot partition (:class:`Plan`).

    ``ca_file``, ``client_cert``, ``client_key``: PEM files checked by
    ``firmware.tls`` and carried to ``/etc/offload``. ``allow_plain_http``
    lets the settings name an ``http://`` server off loopback (written to the
    card's settings as ``allow-plain-http = true``).
    """
    from offload import artifacts

    p = Plan()
    policy = policy or artifacts.find("policy.bin")
    model = model or artifacts.find("weak_int8.tflite")
    if policy is None:
        raise FirmwareError("policy: no --policy given and no committed policy.bin found")
    if model is None:
        raise FirmwareError("model: no --model given and no committed weak_int8.tflite found")
    _check_tflite(model, "model")
    if edgetpu_model is not None:
        _check_tflite(edgetpu_model, "--edgetpu-model")
    d = "/" + BOOT_DIR
    tls_entries = _tls_entries(d, ca_file, client_cert, client_key)
    values = _settings(p, settings_file, policy=policy, key_file=key_file,
                       edgetpu_model=edgetpu_model, tls_files=tuple(tls_entries),
                       allow_plain_http=allow_plain_http)
    if "server" not in values:
        p.notes.append(f"no server in the settings: set it in {BOOT_DIR}/{settings.SETTINGS_NAME} "
                       "on each card before its first boot")
    if key_file is None:
        p.notes.append(f"no --key-file: put the key in {BOOT_DIR}/{settings.KEY_NAME} on each card "
                       "before its first boot")
    if (admin_user is None) != (ssh_key is None):
        raise FirmwareError("--admin-user and --ssh-key go together (a login needs both)")
    keys = None
    if admin_user is not None:
        cloudinit.check_user_name(admin_user)
        keys = cloudinit.check_ssh_key(_read_text(ssh_key, "--ssh-key"), ssh_key)
    if (wifi_ssid is None) and (wifi_password_file is not None or wifi_country is not None):
        raise FirmwareError("--wifi-password-file and --wifi-country need --wifi-ssid")
    password = None
    if wifi_password_file is not None:
        lines = _read_text(wifi_password_file, "--wifi-password-file").splitlines()
        password = lines[0] if lines else ""
    if wifi_country is not None and not (len(wifi_country) == 2 and wifi_country.isalpha()):
        raise FirmwareError(f"--wifi-country {wifi_country!r}: a two-letter ISO 3166 code, e.g. GB")
    net = cloudinit.network_config(wifi_ssid=wifi_ssid, wifi_password=password)
    user = cloudinit.user_data(admin_user=admin_user, ssh_keys=keys,
                               wifi_country=wifi_country.upper() if wifi_country else None)
    p.wheel_files = wheels.check(wheels_dir, info.python)
    p.folders = [d, d + "/wheels"]
    header = ("offload device settings, read once at first boot (docs/firmware.md); edit per card.\n"
              "Keys: those of offload-run (docs/device.md), e.g. server = \"https://10.0.0.2:8443\",\n"
              "camera = 0 (or picamera = 0, video = \"/path\"), accelerator, device, slot-ms; plus\n"
              "rate and depth, checked against the policy's bucket. The API key goes in device.key\n"
              "beside this file (one line), the server's CA in ca.pem (a client certificate in\n"
              "client.pem/client.key); first boot moves them to /etc/offload (0600).")
    p.entries += [
        Entry("/user-data", data=user.encode()),
        Entry("/network-config", data=net.encode()),
        Entry(d + "/firstboot.sh", source=data_path("firstboot.sh")),
        Entry(d + "/" + settings.SETTINGS_NAME, data=settings.to_toml(values, header).encode()),
        Entry(d + "/" + settings.POLICY_NAME, source=os.fspath(policy)),
        Entry(d + "/" + settings.MODEL_NAME, source=os.fspath(model)),
    ]
    if edgetpu_model is not None:
        p.entries.append(Entry(d + "/" + settings.EDGETPU_MODEL_NAME, source=os.fspath(edgetpu_model)))
    p.entries += list(tls_entries.values())
    if key_file is not None:
        # Normalised to the key alone on one line.
        p.entries.append(Entry(d + "/" + settings.KEY_NAME,
                               data=(settings.read_key_file(key_file) + "\n").encode()))
    if edgetpu_deb is not None:
        deb = edgetpu.check_deb(edgetpu_deb)
        if deb.version != edgetpu.PAIRED_VERSION:
            p.notes.append(f"Edge TPU runtime {deb.package} {deb.version} is not the build paired with "
                           f"our LiteRT ({edgetpu.PAIRED_VERSION}, {edgetpu.URL})")
        p.folders.append(d + "/edgetpu")
        p.entries.append(Entry(d + "/edgetpu/" + os.path.basename(edgetpu_deb), source=os.fspath(edgetpu_deb)))
    else:
        p.notes.append(f"no --edgetpu-deb: the device will run the weak model on the CPU "
                       f"(Edge TPU runtime: {edgetpu.URL})")
    return p


def _need_bytes(p, cluster):
    sizes = [e.size for e in p.entries] + [os.path.getsize(f) for f in p.wheel_files]
    clusters = sum(-(-s // cluster) for s in sizes)
    clusters += _DIR_RESERVE_CLUSTERS * len(p.folders) + len(sizes) // 16
    return clusters * cluster


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def _same_file(a, b):
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def build(input_image, output_image, *, force=False, echo=print, **options):
    """Write ``output_image``: ``input_image`` with the device payload on its boot partition.

    ``options`` are :func:`plan`'s keywords. Returns a summary dict.

    Raises
    ------
    FirmwareError
        Any refusal; ``output_image`` is then not created (nor left partial)
        and ``input_image`` is never written to.
    """
    require("sfdisk", "mdir", "mcopy", "mmd", "minfo", "debugfs")
    input_image, output_image = os.fspath(input_image), os.fspath(output_image)
    if _same_file(input_image, output_image):
        raise FirmwareError(f"{output_image}: the output must not be the input image (it is never modified)")
    if os.path.exists(output_image) and not force:
        raise FirmwareError(f"{output_image}: exists; give --force to replace it")
    out_dir = os.path.dirname(os.path.abspath(output_image))
    if not os.path.isdir(out_dir):
        raise FirmwareError(f"{output_image}: folder {out_dir} does not exist")
    info = image.inspect(input_image)
    p = plan(info, **options)
    cluster = fat.cluster_bytes(input_image, info.boot)
    free = fat.free_bytes(input_image, info.boot)
    need = _need_bytes(p, cluster)
    if need > free:
        raise FirmwareError(f"{input_image}: boot partition too small for the payload: it needs "
                            f"{_mb(need)} and the partition has {_mb(free)} free (fewer wheels, or "
                            "enlarge the FAT partition)")
    for n in p.notes:
        echo(f"note: {n}")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(output_image) + ".", suffix=".part",
                               dir=out_dir)
    os.close(fd)
    try:
        echo(f"build: copying {input_image} ({info.pretty_name}, Python {info.python})")
        shutil.copyfile(input_image, tmp)
        boot = info.boot
        for folder in p.folders:
            fat.mkdir(tmp, boot, folder)
        echo(f"build: writing {len(p.wheel_files)} wheels and {len(p.entries)} files "
             f"({_mb(need)}) to the boot partition")
        fat.put_many(tmp, boot, p.wheel_files, "/" + BOOT_DIR + "/wheels")
        for e in p.entries:
            fat.put(tmp, boot, e.data if e.data is not None else e.source, e.dest)
        # Read back what first boot depends on, byte for byte.
        for e in p.entries:
            if e.data is not None:
                want = e.data
            else:
                with open(e.source, "rb") as f:
                    want = f.read()
            if hashlib.sha256(fat.get(tmp, boot, e.dest)).digest() != hashlib.sha256(want).digest():
                raise FirmwareError(f"{output_image}: {e.dest} reads back different from what was written")
        left = fat.free_bytes(tmp, boot)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output_image)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"output": output_image, "release": info.pretty_name, "codename": info.codename,
            "python": info.python, "files": len(p.entries) + len(p.wheel_files),
            "bytes": need, "free_after": left}
