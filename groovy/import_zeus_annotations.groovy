/*
 * import_zeus_annotations.groovy -- bring ZEUS tumor pre-segmentations into the current image.
 *
 * Written for QuPath 0.4, 0.5, 0.6 and 0.7. Works on the open image, and with
 * "Run for project" (Automate > Project scripts, or the script editor's Run > Run for project)
 * on every image of a project written by `zeus` (the project writer puts this script into the
 * project's scripts/ folder).
 *
 * What it does, for the current image (the same rule as bridge/edits.py in zeus-qupath):
 *   1. reads <project>/data/<entryID>/zeus_annotations.geojson (or GEOJSON_PATH below), and, as the
 *      record of everything ZEUS wrote for this image, that file and its backups (*.bak-<time>);
 *   2. reads zeus_imported.json in the same folder: the ZEUS objects this script added before;
 *   3. a ZEUS annotation is "untouched" when its ID is one ZEUS wrote, its class and name are the ones
 *      written, it is not locked, and its outline equals the written one (within float32 precision);
 *      only untouched ones are replaced; everything you edited, moved, reclassified, renamed, locked or
 *      drew is kept (measurements are not used: QuPath clears them when an outline is edited);
 *      each outline is compared with what QuPath made of it: on a Java whose java.awt.geom.Area changes large
 *      outlines (25.0.3, 26.0.1) the outline is added exactly as written, as a geometry ROI, with one WARNING
 *      line naming the Java and what to do, and such a change is never taken for your edit;
 *   4. a ZEUS object you deleted stays deleted; a new ZEUS object is not added when an object with its
 *      ID is in the image, and it is skipped whole (not clipped) when it overlaps an object you kept or
 *      drew, or the place of an object you deleted; so running the script twice changes nothing;
 *   5. when zeus_tiles.geojson is in the same folder (zeus segment --tiles), replaces the image's
 *      earlier ZEUS heatmap tiles with it (Measure > Show measurement maps shows the scores);
 *   6. saves the image data (SAVE), then records the added/replaced IDs in zeus_imported.json.
 *
 * Parameters (edit below):
 *   GEOJSON_PATH  '' = <project>/data/<entryID>/zeus_annotations.geojson; or a path to a GeoJSON file
 *   SAVE          true = save the image data into the project after the import
 */

import com.google.gson.JsonParser

import java.nio.file.Files
import java.nio.file.StandardCopyOption

import org.locationtech.jts.awt.ShapeWriter
import org.locationtech.jts.geom.Coordinate
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.MultiPolygon
import org.locationtech.jts.geom.Polygon
import org.locationtech.jts.geom.util.GeometryFixer

import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.GeometryROI
import qupath.lib.roi.GeometryTools
import qupath.lib.roi.PolygonROI
import qupath.lib.roi.ROIs

import static qupath.lib.scripting.QP.*

// ------------------------------------------------------------------------------------ parameters
String GEOJSON_PATH = ''
boolean SAVE = true

// >>> ZEUS keep-edits rule (mirror of bridge/edits.py in zeus-qupath; the tests require the same answers)
double FLOAT32_REL_TOL = 1.1920928955078125E-7
double OVERLAP_TOL_PX2 = 1.0
String RECORD_FILE = 'zeus_imported.json'
String RECORD_FORMAT = 'zeus-imported/1'
String IMPORTED = 'imported'
String REPLACED = 'replaced'
String BACKUP_INFIX = '.bak-'

// Outlines and the java.awt.geom.Area bug of Java 25.0.3 and 26.0.1 (JDK-8386576): QuPath makes a PolygonROI of
// a polygon without holes and gives its geometry through java.awt.geom.Area, which on those Javas loses area and
// splits large outlines (0.4/0.5 even change the ROI when reading). So what QuPath made of each ZEUS outline is
// compared with the written one (area, parts, holes); when they differ the written outline itself is added, as a
// geometry ROI (no Area), and PolygonROIs are compared by their own vertices, so an outline the Java changed is
// never taken for an edit.
def outlineParts = { g ->
    if (g instanceof Polygon)
        return [1, g.getNumInteriorRing()]
    if (g instanceof MultiPolygon)
        return [g.getNumGeometries(), (0..<g.getNumGeometries()).sum(0) { g.getGeometryN(it).getNumInteriorRing() }]
    return [-1, -1]
}

// same parts and holes, and the same area within what float32 coordinates (QuPath 0.6+) and 0.01 px allow
def sameOutline = { made, exact ->
    if (made == null || exact == null || made.isEmpty() || exact.isEmpty() || outlineParts(made) != outlineParts(exact))
        return false
    def env = exact.getEnvelopeInternal()
    double largest = Math.max(1.0, [env.getMinX(), env.getMaxX(), env.getMinY(), env.getMaxY()].collect { Math.abs(it) }.max())
    return Math.abs(made.getArea() - exact.getArea()) <= exact.getLength() * (FLOAT32_REL_TOL * largest + 0.005) + 1e-6
}

// the outline a ROI holds, without java.awt.geom.Area: a valid PolygonROI's own vertices, else the ROI's geometry
def roiOutline = { roi ->
    if (roi == null)
        return null
    if (roi instanceof PolygonROI) {
        def points = roi.getAllPoints()
        if (points.size() >= 3) {
            def coords = points.collect { new Coordinate(it.getX(), it.getY()) }
            if (!coords[0].equals2D(coords[-1]))
                coords.add(new Coordinate(coords[0]))
            try {
                def polygon = GeometryTools.getDefaultFactory().createPolygon(coords as Coordinate[])
                if (polygon.isValid())
                    return polygon
            } catch (Exception e) {
                // fewer than 4 distinct points: QuPath's geometry below
            }
        }
    }
    return roi.getGeometry()
}

// ID -> the geometry as written, read by QuPath's GeoJSON geometry reader (which does not use java.awt.geom.Area)
def writtenGeometries = { String text ->
    def out = [:]
    def root = JsonParser.parseString(text)
    def features = []
    if (root.isJsonArray())
        features = root.getAsJsonArray().toList()
    else if (root.isJsonObject() && root.getAsJsonObject().has('features'))
        features = root.getAsJsonObject().getAsJsonArray('features').toList()
    else if (root.isJsonObject())
        features = [root]
    for (def f : features) {
        if (!f.isJsonObject())
            continue
        def fo = f.getAsJsonObject()
        if (fo.has('id') && fo.get('id').isJsonPrimitive() && fo.has('geometry') && fo.get('geometry').isJsonObject()) {
            try {
                def g = GsonTools.getInstance().fromJson(fo.get('geometry'), Geometry)
                if (g != null && g.isValid())
                    out[fo.get('id').getAsString()] = g
            } catch (Exception e) {
                // QuPath's reader decides about this feature
            }
        }
    }
    return out
}

// a ROI holding exactly `geometry`, made without java.awt.geom.Area; null when QuPath cannot hold it
def exactRoi = { geometry, plane ->
    try {
        def make = GeometryROI.getDeclaredConstructor(Geometry, ImagePlane)
        make.setAccessible(true)
        def roi = make.newInstance(geometry, plane)
        if (sameOutline(roi.getGeometry(), geometry))
            return roi
    } catch (Exception e) {
        // not accessible in this QuPath: its public (deprecated since 0.6) route below
    }
    try {
        def roi = ROIs.createAreaROI(new ShapeWriter().toShape(geometry), plane)
        if (sameOutline(roi.getGeometry(), geometry))
            return roi
    } catch (Exception e) {
        // nothing else holds it without Area
    }
    return null
}

// QuPath's objects of ZEUS GeoJSON text, each outline as ZEUS wrote it: objects (to add), outlines (ID -> outline,
// for the record), fixed (objects given the written outline), dropped (outlines this Java cannot hold: not added)
def readZeusGeoJson = { String text ->
    def result = [objects: [], outlines: [:], fixed: [], dropped: []]
    def written = writtenGeometries(text)
    for (PathObject o : PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(text.getBytes('UTF-8')))) {
        String id = o.getID() == null ? null : o.getID().toString()
        def w = id == null ? null : written[id]
        def roi = o.getROI()
        if (w != null && roi != null && roi.isArea() && !sameOutline(roi.getGeometry(), w)) {
            def exact = exactRoi(w, roi.getImagePlane())
            if (exact == null) {
                result.dropped.add(o)
                result.outlines[id] = w
                continue
            }
            def ml = o.getMeasurementList()  // setROI clears the measurements: keep them
            def saved = ml.getMeasurementNames().collectEntries { [(it): ml.get(it)] }
            o.setROI(exact)
            saved.each { k, v -> o.getMeasurementList().put(k, v) }
            result.fixed.add(o)
        }
        result.objects.add(o)
        if (id != null)
            result.outlines[id] = roiOutline(o.getROI())
    }
    return result
}

// the one line telling the annotator that this Java changes outlines, and what to do; null when nothing was changed
def outlineWarning = { int fixed, int dropped ->
    if (fixed + dropped == 0)
        return null
    return "WARNING: QuPath runs on Java ${System.getProperty('java.version')}, whose java.awt.geom.Area changes " +
           "large outlines (JDK-8386576; Java 25.0.3 and 26.0.1): ${fixed} ZEUS outline(s) added exactly as written " +
           "but as geometry ROIs (edit them with the brush: no vertex handles)" +
           (dropped ? ", ${dropped} not added (cannot be held exactly)" : '') +
           "; run QuPath on its own bundled Java, or a Java without this bug (e.g. 25.0.2), to get plain polygons"
}

// the GeoJSON file's backups (oldest first), then the file itself (its entries win)
def recordFiles = { File file ->
    def dir = file.getAbsoluteFile().getParentFile()
    def files = []
    if (dir != null && dir.isDirectory())
        files.addAll(dir.listFiles().findAll { it.isFile() && it.getName().startsWith(file.getName() + BACKUP_INFIX) })
    files = files.sort { it.getName() }
    if (file.isFile())
        files.add(file)
    return files
}

// GeoJSON whatever the file name (PathIO.readObjects returns nothing for names not ending in .geojson/.json)
def readGeoJson = { File f -> f.withInputStream { PathIO.readObjectsFromGeoJSON(it) } }

// ID -> [geometry, cls, name] of everything ZEUS wrote for this image; an unreadable file is left out
def writtenRecord = { File file ->
    def record = [:]
    for (File f : recordFiles(file)) {
        try {
            def read = readZeusGeoJson(f.getText('UTF-8'))
            for (PathObject o : read.objects + read.dropped) {
                if (o.getID() != null)
                    record[o.getID().toString()] = [geometry: read.outlines[o.getID().toString()],
                                                    cls: o.getPathClass() == null ? null : o.getPathClass().toString(),
                                                    name: o.getName()]
            }
        } catch (Exception e) {
            println "ZEUS import: ${f.getName()} cannot be read, left out of the record (${e.getMessage()})"
        }
    }
    return record
}

def polygonal = { g -> (g instanceof MultiPolygon && g.getNumGeometries() == 1) ? g.getGeometryN(0) : g }

def sameGeometry = { a, b ->
    if (a == null || b == null || a.isEmpty() || b.isEmpty())
        return false
    def na = polygonal(a).norm()
    def nb = polygonal(b).norm()
    if (na.getNumPoints() != nb.getNumPoints())
        return false
    double largest = 1.0
    for (def c : na.getCoordinates())
        largest = Math.max(largest, Math.max(Math.abs(c.x), Math.abs(c.y)))
    for (def c : nb.getCoordinates())
        largest = Math.max(largest, Math.max(Math.abs(c.x), Math.abs(c.y)))
    return na.equalsExact(nb, FLOAT32_REL_TOL * largest)
}

def isUntouchedZeus = { o, Map written ->
    if (o == null || !o.isAnnotation() || o.getID() == null || o.isLocked() || o.getROI() == null)
        return false
    def w = written[o.getID().toString()]
    if (w == null)
        return false
    String cls = o.getPathClass() == null ? null : o.getPathClass().toString()
    if (cls != w.cls || o.getName() != w.name)
        return false
    return sameGeometry(roiOutline(o.getROI()), w.geometry)
}

// ID -> 'imported' | 'replaced' from zeus_imported.json; empty when absent or unreadable
def readImportRecord = { File dir ->
    def status = [:]
    def file = new File(dir, RECORD_FILE)
    if (!file.isFile())
        return status
    try {
        def data = GsonTools.getInstance().fromJson(file.getText('UTF-8'), Map)
        def objects = data == null ? null : data.get('objects')
        if (objects instanceof Map) {
            objects.each { k, v ->
                if (v == IMPORTED || v == REPLACED)
                    status[k.toString()] = v.toString()
            }
        }
    } catch (Exception e) {
        println "ZEUS import: ${file} cannot be read, starting a new record (${e.getMessage()})"
    }
    return status
}

def writeImportRecord = { File dir, Map status ->
    def data = new LinkedHashMap()
    data.put('format', RECORD_FORMAT)
    data.put('objects', new TreeMap(status))
    def tmp = new File(dir, RECORD_FILE + '.tmp')
    tmp.setText(GsonTools.getInstance(true).toJson(data), 'UTF-8')
    Files.move(tmp.toPath(), new File(dir, RECORD_FILE).toPath(), StandardCopyOption.REPLACE_EXISTING)
}

def areaGeometry = { g ->
    if (g == null || g.isEmpty() || !(g instanceof Polygon || g instanceof MultiPolygon))
        return null
    if (!g.isValid()) // e.g. a self-crossing outline drawn by hand: keep every lobe
        g = GeometryFixer.fix(g)
    return g.getArea() > 0 ? g : null
}

def overlaps = { g, List protectedRegion ->
    def a = areaGeometry(g)
    if (a == null)
        return false
    for (def p : protectedRegion) {
        try {
            if (a.intersection(p).getArea() > OVERLAP_TOL_PX2)
                return true
        } catch (Exception e) { // a broken outline: overlapping bounds count, to be safe
            if (a.getEnvelopeInternal().intersects(p.getEnvelopeInternal()))
                return true
        }
    }
    return false
}

// the merge: what to remove, add and skip, and the record after it (nothing is changed here)
def mergeZeus = { Collection existing, List incoming, Map written, Map status ->
    def objects = existing.findAll { !it.isRootObject() }
    def newIds = new HashSet(incoming.findAll { it.getID() != null }.collect { it.getID().toString() })
    def presentIds = new HashSet(objects.findAll { it.getID() != null }.collect { it.getID().toString() })
    def deletedIds = new TreeSet(status.keySet().findAll { status[it] == IMPORTED && !presentIds.contains(it) })
    def removed = []
    def kept = []
    for (def o : objects) {
        if (isUntouchedZeus(o, written) && !newIds.contains(o.getID().toString()))
            removed.add(o)
        else
            kept.add(o)
    }
    def keptIds = new HashSet(kept.findAll { it.getID() != null }.collect { it.getID().toString() })
    def protectedRegion = []
    for (def o : kept) {
        if (o.isAnnotation() && !isUntouchedZeus(o, written)) {
            def g = areaGeometry(roiOutline(o.getROI()))
            if (g != null)
                protectedRegion.add(g)
        }
    }
    for (String id : deletedIds) {
        def g = written[id] == null ? null : areaGeometry(written[id].geometry)
        if (g != null)
            protectedRegion.add(g)
    }
    def newStatus = new LinkedHashMap(status)
    removed.each { newStatus[it.getID().toString()] = REPLACED }
    def result = [removed: removed, kept: kept, added: [], skipped: [], deleted: [], blocked: [],
                  deletedIds: deletedIds, status: newStatus]
    for (def o : incoming) {
        String id = o.getID() == null ? '' : o.getID().toString()
        if (id && keptIds.contains(id))
            result.skipped.add(o)
        else if (id && deletedIds.contains(id))
            result.deleted.add(o)
        else if (overlaps(roiOutline(o.getROI()), protectedRegion))
            result.blocked.add(o)
        else {
            result.added.add(o)
            if (id)
                newStatus[id] = IMPORTED
        }
    }
    return result
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
List<PathObject> incoming
def read
try {
    read = readZeusGeoJson(file.getText('UTF-8'))  // each outline as written, also on a Java with the Area bug
    incoming = read.objects
} catch (Exception e) {
    println "ZEUS import: ${imageName}: ${file} cannot be read, nothing imported (${e.getMessage()})"
    return
}
String outlineProblem = outlineWarning(read.fixed.size(), read.dropped.size())
if (outlineProblem)
    println "ZEUS import: ${imageName}: ${outlineProblem}"
File recordDir = entry == null ? null : entry.getEntryPath().toFile()
def status = recordDir == null ? [:] : readImportRecord(recordDir)
def written = writtenRecord(file)
def hierarchy = imageData.getHierarchy()
def merge = mergeZeus(hierarchy.getAllObjects(false), incoming, written, status)
// an outline this Java cannot hold is not added; the object it would replace stays
def notHeld = new HashSet(read.dropped.findAll { it.getID() != null }.collect { it.getID().toString() })
for (def o : merge.removed.findAll { notHeld.contains(it.getID().toString()) }) {
    merge.removed.remove(o)
    String id = o.getID().toString()
    if (status.containsKey(id))
        merge.status[id] = status[id]
    else
        merge.status.remove(id)
}

hierarchy.removeObjects(merge.removed, true)
hierarchy.addObjects(merge.added)

// heatmap tiles (optional, `--tiles`): zeus_tiles.geojson beside the annotations replaces earlier ZEUS tiles
File tilesFile = recordDir == null ? null : new File(recordDir, 'zeus_tiles.geojson')
if (tilesFile != null && tilesFile.isFile()) {
    try {
        def tiles = readGeoJson(tilesFile)
        def earlier = hierarchy.getAllObjects(false).findAll {
            it.isTile() && it.getMeasurementList().getMeasurementNames().any { n -> n.startsWith('ZEUS score: ') }
        }
        hierarchy.removeObjects(earlier, true)
        hierarchy.addObjects(tiles)
        println "ZEUS import: ${imageName}: ${tiles.size()} heatmap tile(s), replacing ${earlier.size()}"
    } catch (Exception e) {
        println "ZEUS import: ${imageName}: ${tilesFile} cannot be read, heatmap tiles left as they were (${e.getMessage()})"
    }
}
fireHierarchyUpdate(hierarchy)

println "ZEUS import: ${imageName}: replaced ${merge.removed.size()} untouched ZEUS annotation(s), " +
        "added ${merge.added.size()}, kept ${merge.kept.size()} other object(s); not added: " +
        "${merge.skipped.size()} already present, ${merge.deleted.size()} deleted by you, " +
        "${merge.blocked.size()} over your own or deleted annotations"

if (SAVE && entry != null) {
    entry.saveImageData(imageData)
    writeImportRecord(recordDir, merge.status)
    println "ZEUS import: ${imageName}: image data saved"
} else if (recordDir == null) {
    println "ZEUS import: ${imageName}: not in a project, so deletions cannot be remembered for the next import"
}
