import java.awt.image.BufferedImage;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.locationtech.jts.geom.Coordinate;
import org.locationtech.jts.geom.CoordinateSequence;
import org.locationtech.jts.geom.Geometry;
import org.locationtech.jts.geom.Polygon;
import org.locationtech.jts.io.WKBWriter;
import org.locationtech.jts.io.WKTReader;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;

import groovy.lang.Binding;
import groovy.lang.GroovyShell;
import qupath.lib.common.ColorTools;
import qupath.lib.images.ImageData;
import qupath.lib.io.PathIO;
import qupath.lib.objects.PathObject;
import qupath.lib.objects.PathObjects;
import qupath.lib.objects.PathROIObject;
import qupath.lib.objects.classes.PathClass;
import qupath.lib.objects.hierarchy.PathObjectHierarchy;
import qupath.lib.projects.Project;
import qupath.lib.projects.ProjectIO;
import qupath.lib.roi.PolygonROI;
import qupath.lib.projects.ProjectImageEntry;
import qupath.lib.regions.ImagePlane;
import qupath.lib.roi.GeometryTools;
import qupath.lib.roi.interfaces.ROI;

/**
 * Test harness of zeus-qupath (tests/qupath/harness.py drives it): QuPath's own qupath-core classes do the
 * work, this class only wires them and writes what they return as JSON. Commands (OUT is the JSON result):
 *   geojson OUT FILE...              PathIO.readObjects on each file
 *   project OUT PROJECT.qpproj       ProjectIO.loadProject: classes, entries, each saved hierarchy
 *   run OUT PROJECT SCRIPT [--image NAME]... [--no-save]
 *                                    "Run for project" as QuPath's script editor does it: per entry
 *                                    readImageData (a failure is recorded, the run goes on),
 *                                    QP.setBatchProjectAndImage, the binding variables qupath.script.batchSize,
 *                                    batchIndex, batchLast, batchSave, evaluate (an exception is recorded, the
 *                                    run goes on), then saveImageData unless --no-save ("without save").
 *                                    --image: only these images (in project order)
 *   edit OUT PROJECT EDITS.json      annotator edits through QuPath's API, saved with saveImageData
 * Uses only API present in QuPath 0.4.4, 0.5.1 and 0.6.0. QuPath must be on the system class path.
 */
public class QpHarness {

    static final Gson GSON = new GsonBuilder().serializeSpecialFloatingPointValues().setPrettyPrinting().create();

    public static void main(String[] args) throws Exception {
        Class.forName("qupath.lib.images.servers.ImageServers", true, QpHarness.class.getClassLoader());
        Path out = Paths.get(args[1]);
        JsonObject result = new JsonObject();
        result.addProperty("qupathVersion", String.valueOf(qupath.lib.common.GeneralTools.getVersion()));
        result.addProperty("java", System.getProperty("java.version"));
        switch (args[0]) {
            case "geojson": geojson(result, args); break;
            case "project": project(result, Paths.get(args[2])); break;
            case "run": {
                List<String> names = null;
                boolean save = true;
                for (int i = 4; i < args.length; i++) {
                    if (args[i].equals("--no-save")) save = false;
                    else if (args[i].equals("--image")) {
                        if (names == null) names = new ArrayList<>();
                        names.add(args[++i]);
                    }
                    else throw new IllegalArgumentException("unknown option " + args[i]);
                }
                run(result, Paths.get(args[2]), Paths.get(args[3]), names, save);
                break;
            }
            case "edit": edit(result, Paths.get(args[2]), Paths.get(args[3])); break;
            default: throw new IllegalArgumentException("unknown command " + args[0]);
        }
        Files.writeString(out, GSON.toJson(result), StandardCharsets.UTF_8);
    }

    static String err(Throwable t) {
        StringBuilder sb = new StringBuilder(t.getClass().getName() + ": " + t.getMessage());
        for (Throwable c = t.getCause(); c != null && c != c.getCause(); c = c.getCause())
            sb.append(" | caused by ").append(c.getClass().getName()).append(": ").append(c.getMessage());
        return sb.toString();
    }

    // ------------------------------------------------------------------------------------------ objects as JSON

    static JsonObject object(PathObject o) {
        JsonObject j = new JsonObject();
        j.addProperty("id", o.getID() == null ? null : o.getID().toString());
        j.addProperty("type", o.isAnnotation() ? "annotation" : o.isTile() ? "tile" : o.isCell() ? "cell"
                : o.isDetection() ? "detection" : o.getClass().getSimpleName());
        j.addProperty("name", o.getName());
        PathClass pc = o.getPathClass();
        j.addProperty("class", pc == null ? null : pc.toString());
        if (pc != null && pc.getColor() != null) {
            JsonArray c = new JsonArray();
            int rgb = pc.getColor();
            c.add(ColorTools.red(rgb));
            c.add(ColorTools.green(rgb));
            c.add(ColorTools.blue(rgb));
            j.add("color", c);
        }
        j.addProperty("locked", o.isLocked());
        JsonObject m = new JsonObject();
        var ml = o.getMeasurementList();
        for (String k : ml.getMeasurementNames())
            m.addProperty(k, ml.get(k));
        j.add("measurements", m);
        ROI roi = o.getROI();
        if (roi != null) {
            j.addProperty("roiType", roi.getRoiName());
            j.addProperty("area", roi.getArea());
            j.addProperty("wkb", WKBWriter.toHex(new WKBWriter(2).write(roi.getGeometry())));
            if (roi instanceof PolygonROI) {  // the vertices QuPath holds (getGeometry goes through java.awt.geom.Area)
                List<Coordinate> coords = new ArrayList<>();
                for (var p : roi.getAllPoints())
                    coords.add(new Coordinate(p.getX(), p.getY()));
                if (coords.size() >= 3) {
                    if (!coords.get(0).equals2D(coords.get(coords.size() - 1)))
                        coords.add(new Coordinate(coords.get(0)));
                    try {
                        Polygon held = GeometryTools.getDefaultFactory().createPolygon(coords.toArray(Coordinate[]::new));
                        j.addProperty("verticesWkb", WKBWriter.toHex(new WKBWriter(2).write(held)));
                    } catch (IllegalArgumentException e) {
                        // fewer than 4 points in the ring: no polygon of its vertices
                    }
                }
            }
        }
        return j;
    }

    static JsonArray objects(Collection<PathObject> objects) {
        JsonArray a = new JsonArray();
        for (PathObject o : objects)
            if (!o.isRootObject())
                a.add(object(o));
        return a;
    }

    static void geojson(JsonObject result, String[] args) {
        JsonArray files = new JsonArray();
        for (int i = 2; i < args.length; i++) {
            JsonObject f = new JsonObject();
            f.addProperty("path", args[i]);
            try {
                f.add("objects", objects(new ArrayList<>(PathIO.readObjects(Paths.get(args[i])))));
            } catch (Throwable e) {
                f.addProperty("error", err(e));
            }
            files.add(f);
        }
        result.add("files", files);
    }

    // ------------------------------------------------------------------------------------------ projects

    static Project<BufferedImage> load(Path file) throws IOException {
        return ProjectIO.loadProject(file.toFile(), BufferedImage.class);
    }

    static void project(JsonObject result, Path file) {
        Project<BufferedImage> project;
        try {
            project = load(file);
        } catch (Throwable e) {
            result.addProperty("error", err(e));
            return;
        }
        result.addProperty("version", project.getVersion());
        JsonArray classes = new JsonArray();
        for (PathClass pc : project.getPathClasses()) {
            JsonObject c = new JsonObject();
            c.addProperty("name", pc.toString());
            c.addProperty("rgb", pc.getColor() == null ? null : pc.getColor() & 0xFFFFFF);
            classes.add(c);
        }
        result.add("classes", classes);
        JsonArray entries = new JsonArray();
        for (ProjectImageEntry<BufferedImage> entry : project.getImageList()) {
            JsonObject e = new JsonObject();
            e.addProperty("id", entry.getID());
            e.addProperty("name", entry.getImageName());
            e.addProperty("originalName", entry.getOriginalImageName());
            e.add("uris", uris(entry));
            JsonObject md = new JsonObject();
            entry.getMetadataMap().forEach(md::addProperty);
            e.add("metadata", md);
            e.addProperty("entryPath", String.valueOf(entry.getEntryPath()));
            e.addProperty("hasImageData", entry.hasImageData());
            if (entry.hasImageData()) {
                try {
                    e.add("objects", objects(entry.readHierarchy().getAllObjects(false)));
                } catch (Throwable t) {
                    e.addProperty("error", err(t));
                }
            }
            entries.add(e);
        }
        result.add("entries", entries);
    }

    static JsonArray uris(ProjectImageEntry<BufferedImage> entry) {
        JsonArray a = new JsonArray();
        for (String name : new String[] {"getURIs", "getServerURIs"}) {  // 0.6 / 0.4-0.5
            try {
                Method m = ProjectImageEntry.class.getMethod(name);
                for (Object uri : (Collection<?>) m.invoke(entry))
                    a.add(uri.toString());
                return a;
            } catch (NoSuchMethodException e) {
                // the other name
            } catch (Exception e) {
                a.add("ERROR " + err(e));
                return a;
            }
        }
        return a;
    }

    // ------------------------------------------------------------------------------------------ Run for project

    /** Writes to the real stdout and keeps a copy (what the script printed for one image). */
    static class Tee extends OutputStream {
        final OutputStream a;
        final ByteArrayOutputStream copy = new ByteArrayOutputStream();
        Tee(OutputStream a) { this.a = a; }
        @Override public void write(int b) throws IOException { a.write(b); copy.write(b); }
        @Override public void write(byte[] b, int off, int len) throws IOException { a.write(b, off, len); copy.write(b, off, len); }
        @Override public void flush() throws IOException { a.flush(); }
    }

    static void run(JsonObject result, Path file, Path script, List<String> names, boolean save) throws Exception {
        Project<BufferedImage> project = load(file);
        String text = Files.readString(script, StandardCharsets.UTF_8);
        JsonArray runs = new JsonArray();
        PrintStream stdout = System.out;
        List<ProjectImageEntry<BufferedImage>> batch = new ArrayList<>();
        for (ProjectImageEntry<BufferedImage> entry : project.getImageList())
            if (names == null || names.contains(entry.getImageName()))
                batch.add(entry);
        for (int index = 0; index < batch.size(); index++) {
            ProjectImageEntry<BufferedImage> entry = batch.get(index);
            JsonObject r = new JsonObject();
            r.addProperty("name", entry.getImageName());
            r.addProperty("id", entry.getID());
            runs.add(r);
            ImageData<BufferedImage> imageData;
            try {
                imageData = entry.readImageData();
            } catch (Throwable e) {
                r.addProperty("error", "readImageData: " + err(e));
                continue;
            }
            qupath.lib.scripting.QP.setBatchProjectAndImage(project, imageData);
            Tee tee = new Tee(stdout);
            System.setOut(new PrintStream(tee, true, StandardCharsets.UTF_8));
            try {
                Binding binding = new Binding();
                binding.setVariable("qupath.script.batchSize", batch.size());
                binding.setVariable("qupath.script.batchIndex", index);
                binding.setVariable("qupath.script.batchLast", index == batch.size() - 1);
                binding.setVariable("qupath.script.batchSave", save);
                new GroovyShell(QpHarness.class.getClassLoader(), binding).evaluate(text, script.getFileName().toString());
                if (save) {
                    entry.saveImageData(imageData);  // "Run for project" saves each image after the script
                    r.addProperty("saved", true);
                }
            } catch (Throwable e) {
                r.addProperty("error", "script: " + err(e));
            } finally {
                System.out.flush();
                System.setOut(stdout);
                qupath.lib.scripting.QP.setBatchProjectAndImage(project, null);
            }
            r.addProperty("output", tee.copy.toString(StandardCharsets.UTF_8));
        }
        result.add("runs", runs);
    }

    // ------------------------------------------------------------------------------------------ annotator edits

    static PathObject find(PathObjectHierarchy h, String id) {
        for (PathObject o : h.getAllObjects(false))
            if (o.getID() != null && o.getID().toString().equals(id))
                return o;
        throw new IllegalArgumentException("no object with id " + id);
    }

    static void setGeometry(PathObject o, Geometry g) {
        ((PathROIObject) o).setROI(GeometryTools.geometryToROI(g, o.getROI().getImagePlane()));
    }

    static Geometry moveVertices(Geometry geometry, JsonObject op) {
        Geometry g = geometry.copy();
        Polygon polygon = (Polygon) g.getGeometryN(op.has("part") ? op.get("part").getAsInt() : 0);
        int ring = op.has("ring") ? op.get("ring").getAsInt() : 0;  // 0 = shell, 1.. = holes
        CoordinateSequence cs = (ring == 0 ? polygon.getExteriorRing() : polygon.getInteriorRingN(ring - 1)).getCoordinateSequence();
        double dx = op.get("dx").getAsDouble(), dy = op.get("dy").getAsDouble();
        int last = cs.size() - 1;
        for (JsonElement v : op.getAsJsonArray("vertices")) {
            int i = v.getAsInt();
            cs.setOrdinate(i, 0, cs.getX(i) + dx);
            cs.setOrdinate(i, 1, cs.getY(i) + dy);
            if (i == 0) {  // a closed ring repeats its first point
                cs.setOrdinate(last, 0, cs.getX(0));
                cs.setOrdinate(last, 1, cs.getY(0));
            }
        }
        g.geometryChanged();
        return g;
    }

    static Geometry withoutHoles(Geometry geometry) {
        List<Geometry> parts = new ArrayList<>();
        for (int i = 0; i < geometry.getNumGeometries(); i++) {
            Polygon p = (Polygon) geometry.getGeometryN(i);
            parts.add(geometry.getFactory().createPolygon(p.getExteriorRing().getCoordinates()));
        }
        return geometry.getFactory().buildGeometry(parts).union();
    }

    static void edit(JsonObject result, Path file, Path editsFile) throws Exception {
        Project<BufferedImage> project = load(file);
        JsonArray ops = JsonParser.parseString(Files.readString(editsFile, StandardCharsets.UTF_8)).getAsJsonArray();
        Map<String, List<JsonObject>> byImage = new LinkedHashMap<>();
        for (JsonElement e : ops)
            byImage.computeIfAbsent(e.getAsJsonObject().get("image").getAsString(), k -> new ArrayList<>()).add(e.getAsJsonObject());
        JsonArray drawn = new JsonArray();
        WKTReader wkt = new WKTReader();
        for (var item : byImage.entrySet()) {
            ProjectImageEntry<BufferedImage> entry = project.getImageList().stream()
                    .filter(en -> en.getImageName().equals(item.getKey())).findFirst()
                    .orElseThrow(() -> new IllegalArgumentException("no image named " + item.getKey()));
            ImageData<BufferedImage> imageData = entry.readImageData();
            PathObjectHierarchy h = imageData.getHierarchy();
            for (JsonObject op : item.getValue()) {
                String kind = op.get("op").getAsString();
                PathObject o = op.has("id") ? find(h, op.get("id").getAsString()) : null;
                switch (kind) {
                    case "move_vertices": setGeometry(o, moveVertices(o.getROI().getGeometry(), op)); break;
                    case "translate": ((PathROIObject) o).setROI(o.getROI().translate(op.get("dx").getAsDouble(), op.get("dy").getAsDouble())); break;
                    case "reshape": setGeometry(o, wkt.read(op.get("wkt").getAsString())); break;
                    case "fill_holes": setGeometry(o, withoutHoles(o.getROI().getGeometry())); break;
                    case "cut_hole": setGeometry(o, o.getROI().getGeometry().difference(wkt.read(op.get("wkt").getAsString()))); break;
                    case "delete": h.removeObject(o, true); break;
                    case "reclassify": o.setPathClass(op.get("class").isJsonNull() ? null : PathClass.fromString(op.get("class").getAsString())); break;
                    case "rename": o.setName(op.get("name").isJsonNull() ? null : op.get("name").getAsString()); break;
                    case "lock": o.setLocked(true); break;
                    case "draw": {
                        ROI roi = GeometryTools.geometryToROI(wkt.read(op.get("wkt").getAsString()), ImagePlane.getDefaultPlane());
                        PathClass pc = op.has("class") && !op.get("class").isJsonNull() ? PathClass.fromString(op.get("class").getAsString()) : null;
                        PathObject created = PathObjects.createAnnotationObject(roi, pc);
                        if (op.has("name"))
                            created.setName(op.get("name").getAsString());
                        h.addObject(created);
                        drawn.add(created.getID().toString());
                        break;
                    }
                    default: throw new IllegalArgumentException("unknown edit " + kind);
                }
            }
            entry.saveImageData(imageData);
        }
        result.add("drawn", drawn);
    }
}
