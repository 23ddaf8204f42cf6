"""The QuPath side of zeus-qupath: the keep-edits rule, project writers, the service.

QuPath's GeoJSON (reader 0.2-0.7, writer, ZEUS's marker) is the engine's ``zeus_qupath.qupath_geojson``.
Modules: ``edits`` (the keep-edits rule),
``uris`` (slide paths as QuPath ``file:`` URIs, with a path map for other machines),
``project_files`` (QuPath-free project writer), ``project_paquo`` (writer through paquo and QuPath),
``project`` (``choose_backend``; ``open_project`` opens the one it picks);
``zeus export``: ``export`` (the stage) with ``export_sources``, ``label_masks``, ``correction_stats`` and
``export_report``; ``corrections`` (the corrected images ``zeus learn`` reads).
"""

from .edits import MergeResult, is_untouched_zeus, merge_annotations
from .project import ProjectWriter, open_project, paquo_status
from .project_files import FilesProject, ImageUpdate
from .uris import parse_uri_map, path_to_file_uri

__all__ = [
    "FilesProject",
    "ImageUpdate",
    "MergeResult",
    "ProjectWriter",
    "is_untouched_zeus",
    "merge_annotations",
    "open_project",
    "paquo_status",
    "parse_uri_map",
    "path_to_file_uri",
]
