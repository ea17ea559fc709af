"""``wingbeat export --format dwca``: a Darwin Core Archive (GBIF's exchange format for biodiversity data) of the
store's outputs.

- Event core (``event.txt``): one sampling event per station and window (hour, day or ISO week, UTC), with its
  ``eventDate`` as an ISO 8601 interval and its effort in sensor hours (``sampleSizeValue``/``sampleSizeUnit``).
- Occurrence extension (``occurrence.txt``): one row per model version, cluster and event: a morphospecies named
  by the version and the cluster ("Wingbeat v3 cluster 4"), with the count of its events as ``organismQuantity``
  (``individuals``) and the cluster's wing-beat f0 from the version's cluster cards in ``identificationRemarks``.
  Novel events (no cluster) are a row of their own, so that the counts sum to the events exported.
- Humboldt extension (``humboldt.txt``, row type ``http://rs.tdwg.org/eco/terms/Event``): the sampling effort
  (``samplingEffortValue``/``samplingEffortUnit`` = sensor hours) and the event's duration.
- ``meta.xml`` per the Darwin Core text guide and ``eml.xml`` (EML 2.1.1: title, creator, contact, abstract, pubDate,
  intellectualRights, temporal coverage).

Files are tab-separated UTF-8 with one header line and no quoting; tabs and line breaks in values become spaces.
"""

from __future__ import annotations

import os
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from daemon.report.export import Query, Window, count_windows, version_cards, window_length
from daemon.store.db import Store
from model.cluster import NOVEL

DWC = "http://rs.tdwg.org/dwc/terms/"
ECO = "http://rs.tdwg.org/eco/terms/"
DC = "http://purl.org/dc/terms/"
TEXT_NS = "http://rs.tdwg.org/dwc/text/"
EML_NS = "eml://ecoinformatics.org/eml-2.1.1"
PROTOCOL = (
    "optical insect sensor: wing-beat recordings clustered by a dynamic beta-VAE (Wingbeat); "
    "each event is one insect passing the beam"
)

# (file, row type, [(column, term URI)]); the first column is the event's ID in every file.
EVENT_FIELDS = [
    ("eventID", DWC + "eventID"),
    ("eventDate", DWC + "eventDate"),
    ("samplingProtocol", DWC + "samplingProtocol"),
    ("sampleSizeValue", DWC + "sampleSizeValue"),
    ("sampleSizeUnit", DWC + "sampleSizeUnit"),
    ("locationID", DWC + "locationID"),
    ("type", DC + "type"),
]
OCCURRENCE_FIELDS = [
    ("eventID", DWC + "eventID"),
    ("occurrenceID", DWC + "occurrenceID"),
    ("basisOfRecord", DWC + "basisOfRecord"),
    ("occurrenceStatus", DWC + "occurrenceStatus"),
    ("organismQuantity", DWC + "organismQuantity"),
    ("organismQuantityType", DWC + "organismQuantityType"),
    ("individualCount", DWC + "individualCount"),
    ("scientificName", DWC + "scientificName"),
    ("vernacularName", DWC + "vernacularName"),
    ("verbatimIdentification", DWC + "verbatimIdentification"),
    ("kingdom", DWC + "kingdom"),
    ("class", DWC + "class"),
    ("identifiedBy", DWC + "identifiedBy"),
    ("identificationRemarks", DWC + "identificationRemarks"),
]
HUMBOLDT_FIELDS = [
    ("eventID", DWC + "eventID"),
    ("isSamplingEffortReported", ECO + "isSamplingEffortReported"),
    ("samplingEffortProtocol", ECO + "samplingEffortProtocol"),
    ("samplingEffortValue", ECO + "samplingEffortValue"),
    ("samplingEffortUnit", ECO + "samplingEffortUnit"),
    ("eventDurationValue", ECO + "eventDurationValue"),
    ("eventDurationUnit", ECO + "eventDurationUnit"),
    ("isAbundanceReported", ECO + "isAbundanceReported"),
]
FILES = [
    ("core", "event.txt", DWC + "Event", EVENT_FIELDS),
    ("extension", "occurrence.txt", DWC + "Occurrence", OCCURRENCE_FIELDS),
    ("extension", "humboldt.txt", ECO + "Event", HUMBOLDT_FIELDS),
]


def iso(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns // 10**9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def morphospecies(version: int, cluster: int) -> str:
    if cluster == NOVEL:
        return f"Wingbeat v{version} novel (no cluster)"
    return f"Wingbeat v{version} cluster {cluster}"


def remarks(card: dict[str, Any] | None, cluster: int) -> str:
    """The cluster's wing-beat as the cards give it (``model.cards``): f0, its spread, the harmonics."""
    if cluster == NOVEL:
        return "events the model did not assign to any of its clusters (novel)"
    if card is None:
        return "morphospecies by wing-beat spectrum; this model version has no cluster cards"
    if card.get("f0_hz") is None:
        return f"morphospecies by wing-beat spectrum; no wing-beat f0 above 40 Hz; {card['size']} training events"
    lo, hi = card["f0_iqr_hz"]
    harm = " ".join(f"{h:.2f}" for h in card.get("harmonics") or [])
    return (
        f"morphospecies by wing-beat spectrum; wing-beat f0 {card['f0_hz']:.1f} Hz (interquartile range "
        f"{lo:.1f}-{hi:.1f} Hz), harmonics 1-4 relative strength {harm}; {card['size']} training events"
    )


def clean(v: Any) -> str:
    return str(v).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def event_id(w: Window, location: str, by: str) -> str:
    return f"{location}:{by}:{iso(w.start_ns)}"


def tables(
    state: Path, windows: list[Window], by: str, local_name: str
) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    """(events, occurrences, humboldt) rows, in the fields' order."""
    cards: dict[int, dict[int, dict[str, Any]]] = {}
    events, occurrences, humboldt = [], [], []
    hours = window_length(by) / 3.6e12
    for w in windows:
        location = w.station or local_name
        eid = event_id(w, location, by)
        events.append(
            [eid, f"{iso(w.start_ns)}/{iso(w.end_ns)}", PROTOCOL, w.sensor_hours, "sensor hours", location, "Event"]
        )
        humboldt.append(
            [eid, "true", "sensor hours: per sensor, the clock hours with at least one recorded event",
             w.sensor_hours, "sensor hours", f"{hours:g}", "hours", "true"]
        )  # fmt: skip
        for (version, cluster), n in sorted(w.counts.items()):
            if version not in cards:
                cards[version] = {int(c["cluster"]): c for c in version_cards(state, version)}
            name, why = morphospecies(version, cluster), remarks(cards[version].get(cluster), cluster)
            occurrences.append(
                [eid, f"{eid}:v{version}:{cluster}", "MachineObservation", "present", n, "individuals", n, name, name,
                 name, "Animalia", "Insecta", f"Wingbeat model v{version}", why]
            )  # fmt: skip
    return events, occurrences, humboldt


def meta_xml() -> bytes:
    ET.register_namespace("", TEXT_NS)
    root = ET.Element(f"{{{TEXT_NS}}}archive", {"metadata": "eml.xml"})
    for kind, name, row_type, fields in FILES:
        el = ET.SubElement(
            root,
            f"{{{TEXT_NS}}}{kind}",
            {
                "encoding": "UTF-8",
                "fieldsTerminatedBy": "\\t",
                "linesTerminatedBy": "\\n",
                "fieldsEnclosedBy": "",
                "ignoreHeaderLines": "1",
                "rowType": row_type,
            },
        )
        ET.SubElement(ET.SubElement(el, f"{{{TEXT_NS}}}files"), f"{{{TEXT_NS}}}location").text = name
        ET.SubElement(el, f"{{{TEXT_NS}}}{'id' if kind == 'core' else 'coreid'}", {"index": "0"})
        for i, (_, term) in enumerate(fields):
            ET.SubElement(el, f"{{{TEXT_NS}}}field", {"index": str(i), "term": term})
    ET.indent(root)
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def eml_xml(title: str, creator: str, licence: str, windows: list[Window], events: int) -> bytes:
    """A minimal EML 2.1.1 document (GBIF's metadata profile asks for no more to publish)."""
    ET.register_namespace("eml", EML_NS)
    root = ET.Element(
        f"{{{EML_NS}}}eml",
        {"packageId": f"wingbeat-{time.time_ns()}", "system": "wingbeat", "scope": "system", "xml:lang": "en"},
    )
    ds = ET.SubElement(root, "dataset")
    ET.SubElement(ds, "title").text = title
    ET.SubElement(ET.SubElement(ds, "creator"), "organizationName").text = creator
    ET.SubElement(ds, "pubDate").text = datetime.now(UTC).date().isoformat()
    ET.SubElement(ds, "language").text = "en"
    stations = sorted({w.station or "(local)" for w in windows})
    ET.SubElement(ET.SubElement(ds, "abstract"), "para").text = (
        f"{events} insect events recorded by optical wing-beat sensors at {len(stations)} station(s) "
        f"({', '.join(stations)}), grouped into morphospecies by Wingbeat's model versions and counted per "
        "station and period. Sampling effort is given in sensor hours."
    )
    ET.SubElement(ET.SubElement(ds, "intellectualRights"), "para").text = licence
    if windows:
        dates = ET.SubElement(ET.SubElement(ET.SubElement(ds, "coverage"), "temporalCoverage"), "rangeOfDates")
        for tag, t in (("beginDate", min(w.start_ns for w in windows)), ("endDate", max(w.end_ns for w in windows))):
            ET.SubElement(ET.SubElement(dates, tag), "calendarDate").text = iso(t)[:10]
    ET.SubElement(ET.SubElement(ds, "contact"), "organizationName").text = creator
    ET.indent(root)
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def _text(header: list[tuple[str, str]], rows: list[list[Any]]) -> bytes:
    lines = ["\t".join(name for name, _ in header)] + ["\t".join(clean(v) for v in r) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def write_dwca(
    state: Path,
    out: Path,
    q: Query,
    by: str = "day",
    local_name: str = "local",
    title: str = "",
    creator: str = "Wingbeat deployment",
    licence: str = "This work is licensed under a Creative Commons Attribution (CC-BY 4.0) License.",
) -> tuple[int, int, int]:
    """Write the archive; return (sampling events, occurrence rows, events counted)."""
    if out.suffix != ".zip":
        raise ValueError(f"--out must end in .zip for --format dwca, got {out.name}")
    store = Store(state, readonly=True)
    try:
        windows = count_windows(store, q, by)
    finally:
        store.close()
    events, occurrences, humboldt = tables(state, windows, by, local_name)
    counted = sum(w.events for w in windows)
    title = title or f"Wingbeat insect counts from {state.resolve().name}"
    tmp = out.with_name(f".{out.name}.tmp.zip")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.xml", meta_xml())
        z.writestr("eml.xml", eml_xml(title, creator, licence, windows, counted))
        for (_, name, _, fields), rows in zip(FILES, (events, occurrences, humboldt), strict=True):
            z.writestr(name, _text(fields, rows))
    os.replace(tmp, out)
    return len(events), len(occurrences), counted
