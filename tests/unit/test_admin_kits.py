"""``provision``'s admin kits and the audit log, without a network."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncfed.audit import AuditLog, read_audit
from syncfed.exceptions import ConfigError
from syncfed.net.web import peer_from_certificate
from syncfed.provision import load_project, provision

PROJECT = """
[project]
name = "consortium"

[coordinator]
hosts = ["fl.example.org"]
admin = 9443

[[workers]]
id = "alice"
dial_out = true

[[admins]]
id = "ops@hospital-a.org"
role = "project-admin"

[[admins]]
id = "audit@hospital-b.org"
role = "viewer"
"""


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def project_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "project.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_admin_kit_holds_a_client_certificate_naming_the_admin_and_the_role(tmp_path: Path) -> None:
    kits = provision(load_project(project_file(tmp_path, PROJECT)), tmp_path / "startup")
    kit = kits["ops@hospital-a.org"]
    assert kit == tmp_path / "startup" / "ops@hospital-a.org"
    cert = certificate(kit / "ops@hospital-a.org.crt")
    subject = {attribute.oid: attribute.value for attribute in cert.subject}
    assert subject[NameOID.COMMON_NAME] == "ops@hospital-a.org"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "project-admin"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE((kit / "ops@hospital-a.org.key").stat().st_mode) == 0o600
    assert (kit / "ca.crt").read_bytes() == (tmp_path / "startup" / "ca" / "ca.crt").read_bytes()
    assert tomllib.loads((kit / "admin.toml").read_text(encoding="utf-8")) == {
        "server": "https://fl.example.org:9443",
        "tls-cert": "ops@hospital-a.org.crt",
        "tls-key": "ops@hospital-a.org.key",
        "tls-ca": "ca.crt",
    }
    viewer = certificate(kits["audit@hospital-b.org"] / "audit@hospital-b.org.crt")
    assert viewer.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "viewer"
    # A worker's certificate names no role: the admin API refuses it.
    worker = certificate(kits["alice"] / "alice.crt")
    assert worker.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) == []


def test_the_coordinator_certificate_serves_the_admin_api_when_there_are_admins(tmp_path: Path) -> None:
    text = PROJECT.replace("dial_out = true", "dial_out = false")  # no dial-in listener: only the admin API serves
    kits = provision(load_project(project_file(tmp_path, text)), tmp_path / "startup")
    cert = certificate(kits["coordinator"] / "coordinator.crt")
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in list(usage)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"]


def test_the_admin_port_defaults_to_8443(tmp_path: Path) -> None:
    project = load_project(project_file(tmp_path, PROJECT.replace("admin = 9443\n", "")))
    assert project.admin_port == 8443


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'role = "viewer"',
            'role = "root"',
            "admin audit@hospital-b.org has role 'root', not one of project-admin, viewer",
        ),
        ('id = "audit@hospital-b.org"', 'id = "../etc"', "admin id '../etc' is not a plain name (no slashes)"),
        ('id = "audit@hospital-b.org"', 'id = "alice"', "id 'alice' appears twice"),
        ('hosts = ["fl.example.org"]', "hosts = []", "need the coordinator's hosts"),
        ("admin = 9443", "admin = 0", "coordinator admin port 0 is not in 1..65535"),
        ('role = "viewer"', 'role = "viewer"\nrole_ = 1', "admin audit@hospital-b.org has unknown key 'role_'"),
    ],
)
def test_a_bad_admin_entry_is_refused_in_one_line(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^.*project.toml: ") as caught:
        load_project(project_file(tmp_path, PROJECT.replace(old, new)))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_peer_from_an_admin_certificate_is_the_id_and_the_role() -> None:
    peercert = {
        "subject": ((("organizationName", "p"),), (("organizationalUnitName", "viewer"),), (("commonName", "a@b"),))
    }
    assert peer_from_certificate(peercert) == ("a@b", "viewer")


def test_the_audit_log_is_read_back_line_by_line_and_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(who="ops@a", role="project-admin", action="submit", target="", result="ok", job="job-1")
    log.record(who="v@b", role="viewer", action="abort", target="job-1", result="denied")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = read_audit(path)
    assert [(entry["who"], entry["action"], entry["target"], entry["result"]) for entry in entries] == [
        ("ops@a", "submit", "", "ok"),
        ("v@b", "abort", "job-1", "denied"),
    ]
    assert entries[0]["job"] == "job-1"
    assert entries[0]["time"] <= entries[1]["time"]
    # Reopened (a restarted service), it appends.
    AuditLog(path).record(who="ops@a", role="project-admin", action="jobs", target="", result="ok")
    assert len(read_audit(path)) == 3


def test_a_damaged_audit_log_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record(who="a", role="viewer", action="jobs", target="", result="ok")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"who": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"audit log .*: line 2 is not an audit entry$"):
        read_audit(path)


def test_an_audit_log_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot open audit log .*missing/audit.jsonl: No such file or directory$"):
        AuditLog(tmp_path / "missing" / "audit.jsonl")
