/*
 * import_zeus_annotations.groovy -- bring ZEUS tumor pre-segmentations into the current image.
 *
 * Written for QuPath 0.4, 0.5 and 0.6 (also runs on 0.7). Works on the open image, and with
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

import java.nio.file.Files
import java.nio.file.StandardCopyOption

import org.locationtech.jts.geom.MultiPolygon
import org.locationtech.jts.geom.Polygon
import org.locationtech.jts.geom.util.GeometryFixer

import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

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
            for (PathObject o : readGeoJson(f)) {
                if (o.getID() != null)
                    record[o.getID().toString()] = [geometry: o.getROI() == null ? null : o.getROI().getGeometry(),
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
    return sameGeometry(o.getROI().getGeometry(), w.geometry)
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
            def g = areaGeometry(o.getROI() == null ? null : o.getROI().getGeometry())
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
        else if (overlaps(o.getROI() == null ? null : o.getROI().getGeometry(), protectedRegion))
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
try {
    incoming = readGeoJson(file)
} catch (Exception e) {
    println "ZEUS import: ${imageName}: ${file} cannot be read, nothing imported (${e.getMessage()})"
    return
}
File recordDir = entry == null ? null : entry.getEntryPath().toFile()
def status = recordDir == null ? [:] : readImportRecord(recordDir)
def written = writtenRecord(file)
def hierarchy = imageData.getHierarchy()
def merge = mergeZeus(hierarchy.getAllObjects(false), incoming, written, status)

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
