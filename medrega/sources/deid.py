"""De-identification of DICOM headers before anything derived from them is written (SPEC §4).

Follows the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, applied
conservatively: the profile's attributes below are removed, every person name, date, time and
date-time anywhere in the dataset (sequences included) is removed whatever its tag, private
tags and overlay/curve groups go (overlays can carry burned-in text), and instance UIDs are
replaced by a keyed hash so that a series stays a series and a SEG/RT-STRUCT still points at
its source images after de-identification.

Patient identity survives only as `pseudonym(patient_id, key)`: a keyed hash used for splits
and case names. With the default (public) key it is merely a stable code, not a secret: a real
deployment sets MEDREGA_DEID_KEY so nobody without the key can link a pseudonym to a PatientID.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from medrega.errors import BadInput

# The key used when neither the caller nor MEDREGA_DEID_KEY gives one: deterministic embedded
# data needs a fixed key; it is fine only for data that is public anyway (the packages' scans).
DEFAULT_KEY = "medrega-public-embedded-key"
KEY_ENV = "MEDREGA_DEID_KEY"

# PS3.15 Table E.1-1, Basic Profile attributes (keyword form), whatever their action in the
# table (D/Z/X/X-D...): we keep none of them. Names, dates and times are also caught by VR below;
# listing them here documents the profile and catches ones stored with an unexpected VR.
PROFILE_REMOVE: frozenset[str] = frozenset({
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientAddress", "PatientTelephoneNumbers", "PatientInsurancePlanCodeSequence",
    "PatientReligiousPreference", "PatientComments", "PatientState", "PatientSexNeutered",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "MedicalRecordLocator",
    "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
    "ResponsiblePerson", "ResponsibleOrganization", "PregnancyStatus", "SmokingStatus",
    "MedicalAlerts", "Allergies", "LastMenstrualDate", "SpecialNeeds", "PatientTransportArrangements",
    "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
    # study / visit / procedure
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
    "SeriesDate", "SeriesTime", "SeriesDescription", "AcquisitionDate", "AcquisitionTime",
    "AcquisitionDateTime", "ContentDate", "ContentTime", "InstanceCreationDate",
    "InstanceCreationTime", "OverlayDate", "OverlayTime", "CurveDate", "CurveTime",
    "AdmissionID", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
    "ReasonForStudy", "RequestedProcedureDescription", "RequestedProcedureID",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "ScheduledProcedureStepID", "RequestAttributesSequence", "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence", "ImageComments", "StudyComments",
    "InterpretationText", "TextComments", "TextString", "ProtocolName", "DerivationDescription",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialTimePointID",
    "ClinicalTrialSeriesID", "ContentCreatorName", "StructureSetDate", "StructureSetTime",
    # people and institutions
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "PersonName", "PersonAddress",
    "VerifyingObserverName", "VerifyingOrganization", "ROIInterpreter",
    # equipment
    "StationName", "DeviceSerialNumber", "DeviceUID", "PlateID", "DetectorID", "GantryID",
    "CassetteID", "GeneratorID", "SourceSerialNumber", "DeviceDescription",
    # UIDs we drop rather than remap (they identify the creating system, not the data)
    "InstanceCreatorUID", "IrradiationEventUID", "StorageMediaFileSetUID",
    "FiducialUID", "ConcatenationUID", "TemplateExtensionOrganizationUID",
})
PROFILE_TAGS = frozenset(int(Tag(k)) for k in PROFILE_REMOVE)
# Value representations that hold people or moments: removed wherever they occur.
REMOVE_VRS = frozenset({"PN", "DA", "DT", "TM"})
# UIDs that name a standard (SOP class, transfer syntax, coding scheme): no patient in them,
# and remapping would break decoding. Every other UI element is an instance UID and is remapped.
_STANDARD_UID_WORDS = ("ClassUID", "TransferSyntaxUID", "CodingSchemeUID", "ImplementationClassUID",
                       "MappingResourceUID", "ContextGroupExtensionCreatorUID")


def resolve_key(key: str | bytes | None = None) -> bytes:
    if key is None:
        key = os.environ.get(KEY_ENV) or DEFAULT_KEY
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _digest(key: bytes, domain: str, value: str) -> bytes:
    # A domain label keeps a UID hash and an ID hash of the same string unrelated.
    return hmac.new(key, f"{domain}\x00{value}".encode("utf-8"), hashlib.sha256).digest()


def pseudonym(patient_id: str, key: str | bytes | None = None) -> str:
    """Stable pseudonymous patient id ("p" + 12 hex chars) used for case names and splits."""
    if not str(patient_id).strip():
        raise BadInput("pseudonym: empty PatientID (rule: every scan needs a patient to split on)")
    return "p" + _digest(resolve_key(key), "patient", str(patient_id).strip()).hex()[:12]


def remap_uid(uid: str, key: str | bytes | None = None) -> str:
    """Keyed-hash replacement UID under the 2.25 (UUID-derived) root: same input, same output."""
    number = int.from_bytes(_digest(resolve_key(key), "uid", str(uid).strip())[:16], "big")
    return f"2.25.{number}"


def _is_standard_uid(keyword: str) -> bool:
    return any(keyword.endswith(w) for w in _STANDARD_UID_WORDS)


def _clean(ds: Dataset, key: bytes) -> None:
    for elem in list(ds):  # list(): we delete while walking
        tag = int(elem.tag)
        group = tag >> 16
        if (elem.tag.is_private or tag in PROFILE_TAGS or elem.VR in REMOVE_VRS
                or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF):
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, key)
        elif elem.VR == "UI" and elem.value and not _is_standard_uid(elem.keyword):
            if elem.VM > 1:
                elem.value = [remap_uid(u, key) for u in elem.value]
            else:
                elem.value = remap_uid(elem.value, key)


def deidentify(ds: Dataset, key: str | bytes | None = None) -> tuple[Dataset, str]:
    """De-identify `ds` in place; return it with the patient's pseudonym.

    The pseudonym is taken from PatientID before it is removed and written back as both
    PatientID and PatientName (the profile's "replace with dummy" action), so downstream code
    that expects the attributes finds a non-identifying value.
    """
    k = resolve_key(key)
    pid = str(ds.get("PatientID", "") or "").strip()
    # No PatientID: fall back to the study (then the series) so one scan is still one "patient";
    # a reader must never mix unknown patients into one pseudonym.
    source = pid or str(ds.get("StudyInstanceUID", "") or ds.get("SeriesInstanceUID", "") or "")
    pid_hash = pseudonym(source, k) if source else None
    if pid_hash is None:
        raise BadInput("de-identification: no PatientID, StudyInstanceUID or SeriesInstanceUID "
                         "(rule: every scan needs a patient to split on)")
    _clean(ds, k)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for kw in ("MediaStorageSOPInstanceUID",):
            if kw in meta:
                meta[kw].value = remap_uid(meta[kw].value, k)
    ds.PatientID = pid_hash
    ds.PatientName = pid_hash
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 Basic Profile (medrega.sources.deid), keyed-hash UIDs"
    return ds, pid_hash
