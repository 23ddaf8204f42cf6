"""The QuPath side of zeus-qupath: GeoJSON of every QuPath version, the keep-edits rule, project writers.

Modules: ``qupath_geojson`` (read/write QuPath GeoJSON 0.2-0.7), ``edits`` (the keep-edits rule),
``uris`` (slide paths as QuPath ``file:`` URIs, with a path map for other machines),
``project_files`` (QuPath-free project writer), ``project_paquo`` (writer through paquo and QuPath),
``project`` (``open_project`` picks one).
"""

from .edits import MergeResult, is_untouched_zeus, merge_annotations
from .project import ProjectWriter, open_project, paquo_status
from .project_files import FilesProject, ImageUpdate
from .qupath_geojson import QuPathObject, objects_to_feature_collection, parse_qupath_geojson, read_qupath_geojson
from .uris import parse_uri_map, path_to_file_uri

__all__ = [
    "FilesProject",
    "ImageUpdate",
    "MergeResult",
    "ProjectWriter",
    "QuPathObject",
    "is_untouched_zeus",
    "merge_annotations",
    "objects_to_feature_collection",
    "open_project",
    "paquo_status",
    "parse_qupath_geojson",
    "parse_uri_map",
    "path_to_file_uri",
    "read_qupath_geojson",
]
