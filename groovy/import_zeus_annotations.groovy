/*
 * import_zeus_annotations.groovy -- bring ZEUS tumor pre-segmentations into the current image.
 *
 * Written for QuPath 0.4, 0.5 and 0.6 (also runs on 0.7). Works on the open image, and with
 * "Run for project" (Automate > Project scripts, or the script editor's Run > Run for project)
 * on every image of a project written by `zeus` (the QuPath-free project writer puts this script
 * into the project's scripts/ folder).
 *
 * What it does, for the current image:
 *   1. reads <project>/data/<entryID>/zeus_annotations.geojson (or GEOJSON_PATH below);
 *   2. applies the keep-edits rule (the same rule as bridge/edits.py in zeus-qupath):
 *        - a ZEUS annotation is "untouched" when its name is "ZEUS <class>", its class is still
 *          <class>, its ROI area and vertex count equal the measurements
 *          "ZEUS area px^2" / "ZEUS vertex count" written with it (area within
 *          max(1e-6 x area, 0.5 px^2)), and its centroid lies within 0.5 px of
 *          "ZEUS centroid x" / "ZEUS centroid y" (objects from older ZEUS versions carry no
 *          centroid and are judged without it), so an outline moved as a whole is kept;
 *        - only untouched ZEUS annotations are removed; every other object (edited, renamed,
 *          reclassified, drawn by the annotator, detections) is kept;
 *        - a new object whose ID is already in the image is not added again, so running the
 *          script twice on the same file changes nothing;
 *   3. stamps the area, vertex count and centroid of each new object as QuPath holds its ROI, adds the
 *      objects and saves the image data (entry.saveImageData) when SAVE is true.
 *
 * Parameters (edit below):
 *   GEOJSON_PATH  '' = <project>/data/<entryID>/zeus_annotations.geojson; or a path to a GeoJSON file
 *   SAVE          true = save the image data into the project after the import
 */

import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

import static qupath.lib.scripting.QP.*

// ------------------------------------------------------------------------------------ parameters
String GEOJSON_PATH = ''
boolean SAVE = true

// >>> ZEUS keep-edits rule (mirror of bridge/edits.py; keep both scripts and the Python module in sync)
def ZEUS_NAME_PREFIX = 'ZEUS'
def MEAS_AREA_PX = 'ZEUS area px^2'
def MEAS_VERTICES = 'ZEUS vertex count'
def MEAS_CENTROID_X = 'ZEUS centroid x'
def MEAS_CENTROID_Y = 'ZEUS centroid y'
double AREA_REL_TOL = 1e-6
double AREA_ABS_TOL_PX2 = 0.5
double CENTROID_TOL_PX = 0.5

def zeusClassFromName = { name ->
    String marker = ZEUS_NAME_PREFIX + ' '
    if (name == null || !name.toString().startsWith(marker))
        return null
    return name.toString().substring(marker.length())
}

def isUntouchedZeus = { o ->
    if (o == null || !o.isAnnotation() || o.getROI() == null)
        return false
    def zeusClass = zeusClassFromName(o.getName())
    if (zeusClass == null)
        return false
    def pathClass = o.getPathClass()
    String className = pathClass == null ? null : pathClass.toString()
    if (className != zeusClass)
        return false
    def ml = o.getMeasurementList()
    if (!ml.containsKey(MEAS_AREA_PX) || !ml.containsKey(MEAS_VERTICES))
        return false
    double written = ml.get(MEAS_AREA_PX)
    double area = o.getROI().getArea()
    if (Double.isNaN(written) || Math.abs(area - written) > Math.max(AREA_REL_TOL * Math.abs(written), AREA_ABS_TOL_PX2))
        return false
    def geometry = o.getROI().getGeometry()
    long vertices = geometry.getNumPoints()
    if (vertices != Math.round(ml.get(MEAS_VERTICES)))
        return false
    // centroid (JTS, as shapely computes it): checked when written; older ZEUS output has none
    boolean hasX = ml.containsKey(MEAS_CENTROID_X)
    boolean hasY = ml.containsKey(MEAS_CENTROID_Y)
    if (!hasX && !hasY)
        return true
    if (!hasX || !hasY)
        return false
    def centroid = geometry.getCentroid()
    if (centroid.isEmpty())
        return false
    double dist = Math.hypot(centroid.getX() - ml.get(MEAS_CENTROID_X), centroid.getY() - ml.get(MEAS_CENTROID_Y))
    return dist <= CENTROID_TOL_PX
}

def stampZeusMeasurements = { o ->
    if (o.getROI() == null || zeusClassFromName(o.getName()) == null)
        return
    def ml = o.getMeasurementList()
    ml.put(MEAS_AREA_PX, o.getROI().getArea())
    def geometry = o.getROI().getGeometry()
    ml.put(MEAS_VERTICES, (double) geometry.getNumPoints())
    def centroid = geometry.getCentroid()
    if (!centroid.isEmpty()) {
        ml.put(MEAS_CENTROID_X, centroid.getX())
        ml.put(MEAS_CENTROID_Y, centroid.getY())
    }
    ml.close()
}
// <<< ZEUS keep-edits rule

// ------------------------------------------------------------------------------------ the import
def imageData = getCurrentImageData()
if (imageData == null) {
    println 'ZEUS import: no image is open (open one, or use Run for project)'
    return
}
def entry = getProjectEntry()
File file
if (GEOJSON_PATH) {
    file = new File(GEOJSON_PATH)
} else if (entry != null) {
    file = entry.getEntryPath().resolve('zeus_annotations.geojson').toFile()
} else {
    println 'ZEUS import: the image is not in a project; set GEOJSON_PATH'
    return
}
String imageName = entry == null ? imageData.getServer().getMetadata().getName() : entry.getImageName()
if (!file.isFile()) {
    println "ZEUS import: ${imageName}: no ZEUS annotations (${file} not found), nothing to do"
    return
}

List<PathObject> incoming = PathIO.readObjects(file)
def hierarchy = imageData.getHierarchy()
def toRemove = hierarchy.getAnnotationObjects().findAll { isUntouchedZeus(it) }
def removeSet = new HashSet<PathObject>(toRemove)
def keptIds = new HashSet()
for (PathObject o : hierarchy.getAllObjects(false)) {
    if (!removeSet.contains(o))
        keptIds.add(o.getID())
}
def toAdd = incoming.findAll { !keptIds.contains(it.getID()) }
toAdd.each { stampZeusMeasurements(it) }

hierarchy.removeObjects(toRemove, true)
hierarchy.addObjects(toAdd)
fireHierarchyUpdate(hierarchy)

int kept = hierarchy.getAnnotationObjects().size() - toAdd.size()
println "ZEUS import: ${imageName}: replaced ${toRemove.size()} untouched ZEUS annotation(s), " +
        "added ${toAdd.size()}, skipped ${incoming.size() - toAdd.size()} already present, " +
        "kept ${kept} other annotation(s)"

if (SAVE && entry != null) {
    entry.saveImageData(imageData)
    println "ZEUS import: ${imageName}: image data saved"
}
