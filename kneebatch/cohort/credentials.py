"""TLS credentials for a dask cluster that spans nodes: a per-job CA and one certificate it signs,
used by the scheduler, every worker and ``kneebatch run`` alike (mutual TLS: a peer without the
certificate is refused). The CA's key is never written, so nobody can sign another certificate;
the folder and its files are readable by their owner only."""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any

from kneebatch.errors import ConfigError

VALID_DAYS = 30  # a cohort job's lifetime, with room


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The files of one credentials folder (``dask scheduler/worker --tls-ca-file --tls-cert
    --tls-key``; ``kneebatch run --tls-dir``)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        return cls(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")

    def security(self, *, every_role: bool = False) -> Any:
        """A ``distributed.security.Security`` that requires TLS with these files: as a client,
        or (``every_role``) also as the scheduler and its workers (``--cluster slurm``).

        Raises:
            ConfigError: a file is missing.
        """
        from distributed.security import Security

        missing = [str(p) for p in (self.ca, self.cert, self.key) if not p.is_file()]
        if missing:
            raise ConfigError(f"TLS credentials missing: {', '.join(missing)}. Create them with "
                              "`kneebatch tls-credentials DIR` before starting the scheduler.")
        pair = {"cert": str(self.cert), "key": str(self.key)}
        roles = ("client", "scheduler", "worker") if every_role else ("client",)
        return Security(require_encryption=True, tls_ca_file=str(self.ca),
                        **{f"tls_{role}_{k}": v for role in roles for k, v in pair.items()})


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_credentials(folder: Path) -> TlsFiles:
    """Create ``folder`` (mode 0700) holding a new CA's certificate and a certificate and key it
    signed (mode 0600).

    Raises:
        ConfigError: ``folder`` exists already (credentials are made once per job).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError as exc:
        raise ConfigError(f"{folder} exists already: give each job its own credentials folder "
                          "(e.g. OUT/.kneebatch/tls-$SLURM_JOB_ID).") from exc
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kneebatch job CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kneebatch")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles.in_folder(folder)
    _write_private(files.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return files
