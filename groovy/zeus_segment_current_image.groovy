/*
 * zeus_segment_current_image.groovy -- ask the local ZEUS service to pre-segment the open image.
 *
 * Written for QuPath 0.4, 0.5 and 0.6 (also runs on 0.7); needs Java 11+ (java.net.http), which
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

import org.locationtech.jts.geom.MultiPolygon
import org.locationtech.jts.geom.Polygon
import org.locationtech.jts.geom.util.GeometryFixer

import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

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
def regionGeometry = null
if (USE_SELECTION && selected != null && selected.isAnnotation() && selected.getROI() != null && selected.getROI().isArea()) {
    request.add('region', GsonTools.getInstance().toJsonTree(selected.getROI()))
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

println "ZEUS: segmenting ${slide}${regionGeometry == null ? '' : ' (selected region)'} ..."
HttpResponse<String> response
try {
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

String body = response.body()
def answer = null
try {
    answer = JsonParser.parseString(body)
} catch (Exception ignored) {
    // not JSON: reported below
}
String error = null
if (answer != null && answer.isJsonObject() && answer.getAsJsonObject().has('error'))
    error = answer.getAsJsonObject().get('error').getAsString()
if (response.statusCode() != 200 || error != null || answer == null || answer.isJsonNull()) {
    if (error == null)
        error = body.length() > 300 ? body.substring(0, 300) + '...' : body
    String hint = ''
    if (response.statusCode() == 401)
        hint = '\n(Set TOKEN in this script or the environment variable ZEUS_TOKEN to the token zeus serve printed.)'
    else if (response.statusCode() == 403)
        hint = '\n(The service may only read slides under its folders: start it with zeus serve --root <folder of this slide>.)'
    showMessage("The ZEUS service answered with an error (HTTP ${response.statusCode()}):\n${error}${hint}", true)
    return
}

List<PathObject> incoming
try {
    incoming = PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(body.getBytes(StandardCharsets.UTF_8)))
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
for (PathObject o : incoming) {  // the answer is ZEUS output too
    if (o.getID() != null)
        written[o.getID().toString()] = [geometry: o.getROI() == null ? null : o.getROI().getGeometry(),
                                         cls: o.getPathClass() == null ? null : o.getPathClass().toString(),
                                         name: o.getName()]
}
def status = recordDir == null ? [:] : readImportRecord(recordDir)
def hierarchy = imageData.getHierarchy()
def merge = mergeZeus(hierarchy.getAllObjects(false), incoming, written, status)
// with a region, untouched ZEUS annotations outside it stay; the selected annotation always stays
def keepAnyway = merge.removed.findAll {
    it == selected || (regionGeometry != null && !regionGeometry.covers(it.getROI().getGeometry()))
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
