/*
 * zeus_segment_current_image.groovy -- ask the local ZEUS service to pre-segment the open image.
 *
 * Written for QuPath 0.4, 0.5, 0.6 and 0.7; needs Java 11+ (java.net.http), which
 * every QuPath >= 0.3 ships with. The service's API is described at <service>/openapi.json.
 *
 * What it does:
 *   1. sends POST <SERVICE_URL> with the JSON
 *        {"slide": <path of the current image's file>, "region": <selected annotation as a GeoJSON
 *         geometry in level-0 px, only when one is selected and USE_SELECTION is true>,
 *         "model": ..., "prompts": ..., "threshold": ...}   (empty parameters are left out)
 *      and the header "Authorization: Bearer <token>" (TOKEN below, or the environment variable
 *      ZEUS_TOKEN); the service is started on this computer with `zeus serve`;
 *   2. reads the answer, a QuPath GeoJSON FeatureCollection of ZEUS annotations;
 *   3. merges it with the keep-edits rule of import_zeus_annotations.groovy (the same rule as
 *      bridge/edits.py in zeus-qupath): only untouched ZEUS annotations are replaced -- with a region,
 *      only those lying inside the region -- and every object you edited, moved, reclassified, renamed,
 *      locked or drew is kept; a ZEUS object you deleted stays deleted; a new object is not added over
 *      your own annotations. "Untouched" is judged against the record of what ZEUS wrote for this image:
 *      in a project, data/<entryID>/zeus_annotations.geojson (what `zeus` wrote) and
 *      data/<entryID>/zeus_service.geojson (what this script received before; each answer is kept,
 *      the previous one as a *.bak-<time> backup);
 *   4. adds the new annotations and, in a project, saves the image data (SAVE) and then the record
 *      (zeus_imported.json, as the import script does). Outside a project nothing is recorded, so
 *      nothing earlier is replaced: the new annotations are only added where they overlap nothing of yours.
 * A dialog explains what went wrong when the service is not running (connection refused) or
 * answers with an error ({"error": "..."}).
 *
 * Parameters (edit below):
 *   SERVICE_URL      the service endpoint (default http://127.0.0.1:8765/segment)
 *   TOKEN            '' = read the environment variable ZEUS_TOKEN
 *   MODEL, PROMPTS   '' = the service's defaults (e.g. MODEL = 'conch', PROMPTS = 'spindle_cell', or the
 *                    path of a prompt file in a folder the service was started with: --root FOLDER)
 *   THRESHOLD        null = the ZEUS rule; a number between 0 and 1 = probability threshold
 *   USE_SELECTION    true = segment only inside the selected annotation, if one is selected
 *   TIMEOUT_MINUTES  how long to wait for the answer
 *   SAVE             true = in a project, save the image data after adding (needed to remember deletions)
 * QuPath's Extensions > ZEUS (bridge/extension) sends the request itself and runs this script with the args
 * ANSWER_FILE=<the service's answer> and REGION_ID=<ID of the annotation it segmented, '' = the whole image>:
 * then no request is sent here, and the answer is merged by the same rule.
 */

import com.google.gson.JsonParser
import com.google.gson.JsonObject

import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.nio.charset.StandardCharsets
import java.nio.file.Files
import java.nio.file.Paths
import java.nio.file.StandardCopyOption
import java.time.Duration

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
String SERVICE_URL = 'http://127.0.0.1:8765/segment'
String TOKEN = ''
String MODEL = ''
String PROMPTS = ''
Double THRESHOLD = null
boolean USE_SELECTION = true
int TIMEOUT_MINUTES = 60
boolean SAVE = true
String ANSWER_FILE = ''  // set by the extension (args, below): the answer it received; no request is sent
String REGION_ID = ''    // with ANSWER_FILE: the annotation whose area was segmented ('' = the whole image)
if (binding.hasVariable('args')) {
    for (def arg : binding.getVariable('args')) {
        String a = arg.toString()
        if (a.startsWith('ANSWER_FILE='))
            ANSWER_FILE = a.substring('ANSWER_FILE='.length())
        else if (a.startsWith('REGION_ID='))
            REGION_ID = a.substring('REGION_ID='.length())
    }
}

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

// ------------------------------------------------------------------------------------ messages
def scriptClassLoader = this.getClass().getClassLoader()
def showMessage = { String text, boolean isError ->
    println((isError ? 'ZEUS error: ' : 'ZEUS: ') + text)
    for (String className : ['qupath.fx.dialogs.Dialogs', 'qupath.lib.gui.dialogs.Dialogs']) {
        try {
            def dialogs = Class.forName(className, true, scriptClassLoader)
            if (isError)
                dialogs.showErrorMessage('ZEUS', text)
            else
                dialogs.showPlainMessage('ZEUS', text)
            return
        } catch (ClassNotFoundException ignored) {
            // try the next location of the Dialogs class (it moved in QuPath 0.5)
        } catch (Throwable ignored) {
            return // no GUI (e.g. command line): the message was printed
        }
    }
}

// ------------------------------------------------------------------------------------ the request
def imageData = getCurrentImageData()
if (imageData == null) {
    showMessage('Open an image first.', true)
    return
}
def server = imageData.getServer()
def uris = server.getURIs()
if (uris.isEmpty()) {
    showMessage('The current image has no file that the ZEUS service could read.', true)
    return
}
def uri = uris.iterator().next()
String slide = 'file'.equalsIgnoreCase(uri.getScheme()) ? Paths.get(uri).toString() : uri.toString()

def request = new JsonObject()
request.addProperty('slide', slide)
PathObject selected = getSelectedObject()
if (ANSWER_FILE) {  // the extension segmented the annotation REGION_ID, or the whole image
    selected = REGION_ID ? imageData.getHierarchy().getAllObjects(false).find {
        it.getID() != null && it.getID().toString() == REGION_ID } : null
    if (REGION_ID && selected == null) {
        showMessage('The annotation ZEUS segmented was deleted meanwhile; nothing was added.', true)
        return
    }
}
def regionGeometry = null
if (USE_SELECTION && selected != null && selected.isAnnotation() && selected.getROI() != null && selected.getROI().isArea()) {
    // toJson, then parse: QuPath 0.4.4's ROI adapter cannot write into a JsonTreeWriter (toJsonTree throws)
    request.add('region', JsonParser.parseString(GsonTools.getInstance().toJson(selected.getROI())))
    regionGeometry = selected.getROI().getGeometry()
}
if (MODEL)
    request.addProperty('model', MODEL)
if (PROMPTS)
    request.addProperty('prompts', PROMPTS)
if (THRESHOLD != null)
    request.addProperty('threshold', THRESHOLD)

String token = TOKEN ? TOKEN : System.getenv('ZEUS_TOKEN')
def client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build()
def builder = HttpRequest.newBuilder(URI.create(SERVICE_URL))
        .timeout(Duration.ofMinutes(TIMEOUT_MINUTES))
        .header('Content-Type', 'application/json')
        .POST(HttpRequest.BodyPublishers.ofString(request.toString(), StandardCharsets.UTF_8))
if (token)
    builder.header('Authorization', 'Bearer ' + token)

println "ZEUS: ${ANSWER_FILE ? 'adding the answer for' : 'segmenting'} ${slide}${regionGeometry == null ? '' : ' (selected region)'} ..."
HttpResponse<String> response
try {
    if (!ANSWER_FILE)
        response = client.send(builder.build(), HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8))
} catch (ConnectException e) {
    showMessage("The ZEUS service is not running at ${SERVICE_URL}.\nStart it on this computer with: zeus serve", true)
    return
} catch (HttpTimeoutException e) {
    showMessage("The ZEUS service did not answer within ${TIMEOUT_MINUTES} minutes.", true)
    return
} catch (IOException e) {
    showMessage("Cannot reach the ZEUS service at ${SERVICE_URL}: ${e.getMessage()}", true)
    return
}

String body = ANSWER_FILE ? new File(ANSWER_FILE).getText('UTF-8') : response.body()
int statusCode = ANSWER_FILE ? 200 : response.statusCode()
def answer = null
try {
    answer = JsonParser.parseString(body)
} catch (Exception ignored) {
    // not JSON: reported below
}
String error = null
if (answer != null && answer.isJsonObject() && answer.getAsJsonObject().has('error'))
    error = answer.getAsJsonObject().get('error').getAsString()
if (statusCode != 200 || error != null || answer == null || answer.isJsonNull()) {
    if (error == null)
        error = body.length() > 300 ? body.substring(0, 300) + '...' : body
    String hint = ''
    if (statusCode == 401)
        hint = '\n(Set TOKEN in this script or the environment variable ZEUS_TOKEN to the token zeus serve printed.)'
    else if (statusCode == 403)
        hint = '\n(The service may only read slides under its folders: start it with zeus serve --root <folder of this slide>.)'
    showMessage("The ZEUS service answered with an error (HTTP ${statusCode}):\n${error}${hint}", true)
    return
}

List<PathObject> incoming
def read
try {
    read = readZeusGeoJson(body)  // each outline as written, also on a Java with the Area bug
    incoming = read.objects
} catch (Exception e) {
    showMessage("The ZEUS service answered with something that is not QuPath GeoJSON: ${e.getMessage()}", true)
    return
}

// ------------------------------------------------------------------------------------ keep edits, add
def entry = getProjectEntry()
File recordDir = entry == null ? null : entry.getEntryPath().toFile()
File serviceRecord = recordDir == null ? null : new File(recordDir, 'zeus_service.geojson')
def written = [:]
if (recordDir != null) {
    written.putAll(writtenRecord(new File(recordDir, 'zeus_annotations.geojson')))
    written.putAll(writtenRecord(serviceRecord))
}
for (PathObject o : incoming + read.dropped) {  // the answer is ZEUS output too
    if (o.getID() != null)
        written[o.getID().toString()] = [geometry: read.outlines[o.getID().toString()],
                                         cls: o.getPathClass() == null ? null : o.getPathClass().toString(),
                                         name: o.getName()]
}
def status = recordDir == null ? [:] : readImportRecord(recordDir)
def hierarchy = imageData.getHierarchy()
// the selected annotation is the area to fill, not an object of yours to keep clear (it stays, untouched); when
// it is a ZEUS outline, its import record must not make it look deleted by you (its area would block the answer)
String selectedId = regionGeometry != null && selected.getID() != null ? selected.getID().toString() : null
def merge = mergeZeus(hierarchy.getAllObjects(false).findAll { it != selected || regionGeometry == null },
        incoming.findAll { selectedId == null || it.getID() == null || it.getID().toString() != selectedId },
        written, selectedId == null ? status : status.findAll { k, v -> k != selectedId })
if (selectedId != null && status.containsKey(selectedId))
    merge.status[selectedId] = status[selectedId]  // its record stays as it was
// with a region, untouched ZEUS annotations outside it stay; the selected annotation always stays; so does one
// whose new outline this Java cannot hold (not added)
def notHeld = new HashSet(read.dropped.findAll { it.getID() != null }.collect { it.getID().toString() })
def keepAnyway = merge.removed.findAll {
    it == selected || notHeld.contains(it.getID().toString()) ||
        (regionGeometry != null && !regionGeometry.covers(roiOutline(it.getROI())))
}
def toRemove = merge.removed.findAll { !keepAnyway.contains(it) }
for (def o : keepAnyway) {  // not replaced after all: their record stays as it was
    String id = o.getID().toString()
    if (status.containsKey(id))
        merge.status[id] = status[id]
    else
        merge.status.remove(id)
}
hierarchy.removeObjects(toRemove, true)
hierarchy.addObjects(merge.added)
fireHierarchyUpdate(hierarchy)

String summary = "Added ${merge.added.size()} ZEUS annotation(s), replaced ${toRemove.size()} untouched one(s); " +
        "not added: ${merge.skipped.size()} already present, ${merge.deleted.size()} deleted by you, " +
        "${merge.blocked.size()} over your own annotations. Edited and hand-drawn objects were kept."
println 'ZEUS: ' + summary
String outlineProblem = outlineWarning(read.fixed.size(), read.dropped.size())
if (outlineProblem)
    showMessage(outlineProblem, true)  // prints it as one line too
if (SAVE && entry != null) {
    entry.saveImageData(imageData)
    if (serviceRecord.isFile())
        Files.move(serviceRecord.toPath(), new File(recordDir, serviceRecord.getName() + BACKUP_INFIX +
                System.currentTimeMillis()).toPath(), StandardCopyOption.ATOMIC_MOVE)
    serviceRecord.setText(body, 'UTF-8')
    writeImportRecord(recordDir, merge.status)
    println 'ZEUS: image data saved'
} else if (entry == null) {
    println 'ZEUS: the image is not in a project, so what ZEUS wrote cannot be remembered for the next run'
}
if (merge.added.isEmpty())
    showMessage('The ZEUS service found no new tumor regions for this image' + (regionGeometry == null ? '.' : ' region.'), false)
